"""Stage `tokenizer`: train the MaskGIT VQGAN that MAGE tokenizes images with.

Arguments (comma separated): `demo` (Fashion-MNIST at 32 px, trains on a 2-core CPU in
minutes), `paper` (MaskGIT's settings at 256 px on ImageNet; also the default), `smoke`
(with demo: 20 steps, to check an installation or a notebook).

    python -m mage_jax.main --config=configs/tokenizer.py:demo --workdir=/tmp/tok
"""
import ml_collections

from mage_jax import config_defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    presets = config_defaults.parse_args(arg, known=("demo", "paper", "smoke"))
    config = config_defaults.base_config("tokenizer")
    config.batch_size = 256
    config.total_steps = 1_000_000

    # MAGE's tokenizer (config/vqgan.yaml of the official code): factor 16 at 256 px.
    config.tokenizer = ml_collections.ConfigDict(dict(
        ch=128,
        ch_mult=(1, 1, 2, 2, 4),
        num_res_blocks=2,
        z_channels=256,
        embed_dim=256,
        codebook_size=1024,
        entropy_temperature=0.01,
        dtype="float32",
    ))
    config.discriminator = ml_collections.ConfigDict(dict(
        # "maskgit": MaskGIT's own discriminator (maskgit/nets/discriminator.py), with
        # MaskGIT's discriminator config (configs/vqgan_config.py): channel_multiplier 1,
        # blur_resample True; `filters` is the 512 of its width table (not a MaskGIT key).
        # "stylegan2_mbstd": the variant with minibatch-stddev, widths ch * ch_mult.
        kind="maskgit",
        filters=512,
        channel_multiplier=1,
        blur_resample=True,
        ch=64,  # stylegan2_mbstd only
        ch_mult=(2, 4, 8, 8, 8),  # stylegan2_mbstd only
    ))

    # MaskGIT's loss weights (configs/vqgan_config.py: perceptual_loss_weight 0.1,
    # g_adversarial_loss_weight 0.1, non-saturating loss, r1 grad_penalty_cost 10, commitment
    # 0.25, entropy_loss_ratio 0.1).
    config.loss = ml_collections.ConfigDict(dict(
        reconstruction="l2",
        reconstruction_weight=1.0,
        codebook_weight=1.0,
        commitment_weight=0.25,
        entropy_weight=0.1,
        perceptual_weight=0.1,
        # The perceptual term: a frozen network on both images, the mean squared difference
        # of its outputs (mage_jax/models/resnet50.py). "resnet50_features": an ImageNet
        # ResNet-50's last feature map (7x7x2048 at 224 px). MaskGIT's trainer is not
        # public; its vqgan_config.py sets pretrained_image_model=True and
        # perceptual_loss_on_logit=False, and the code of MAGVIT (same authors, same config
        # keys: google-research/magvit, videogvt/train_lib) reads False as this feature map.
        # "resnet50_logits": its 1000 logits instead (MAGVIT's own configs; MaskBit's VQGAN+,
        # markweberdev/maskbit modeling/modules/perceptual_loss.py). "lpips": LPIPS (VGG16),
        # taming's VQGAN loss.
        perceptual_kind="resnet50_features",
        # Its weights: for resnet50_* torchvision's resnet50-0676ba61.pth (or an .npz with
        # its keys; MaskGIT's own ResNet-50 was not released), for lpips the lpips package's
        # files (vgg16.pth,lin.pth). Without a file the perceptual term is off (the log says
        # so at start): no weights can be downloaded at run time.
        perceptual_weights=ml_collections.FieldReference(None, field_type=str),
        adversarial_weight=0.1,
        r1_weight=10.0,
        # R1 every step: MaskGIT's config has no R1 interval (only gradient_penalty "r1" and
        # its cost) and its libml/losses.py r1_gradient_penalty has none either. k > 1 is
        # StyleGAN2's lazy R1: the penalty every k steps, weighted x k.
        r1_every=1,
        # The discriminator and adversarial loss start at this step. 0: MaskGIT's config has
        # no delay (no discriminator-start setting, unlike taming's disc_start).
        adversarial_warmup_steps=0,
    ))

    # MaskGIT: Adam with betas (0, 0.99) and a constant 1e-4 after warm-up, for the VQGAN and
    # the discriminator alike. Constant (not total_steps-dependent) so a run extended with a
    # larger total_steps continues on the same learning-rate curve.
    config.optimizer = ml_collections.ConfigDict(dict(
        lr=1e-4,
        b1=0.0,
        b2=0.99,
        warmup_steps=2000,  # MaskGIT's configs/base_config.py: lr_warmup_steps 2_000
        # "constant" (MaskGIT) or "cosine": cosine to 0 at `decay_steps` (a fixed-length run).
        schedule="constant",
        decay_steps=0,
        weight_decay=0.0,
        grad_clip_norm=0.0,  # 0 disables clipping
    ))

    # MaskGIT keeps a Polyak average (EMA) of the VQGAN's weights, decay 0.999; the EMA
    # weights are the tokenizer: what the summaries, the test scores, `encode`/`decode` and
    # the pretrain stage read (checkpointing.restore_params). 0 turns it off.
    config.ema_decay = 0.999

    config.data = config_defaults.data_config("imagenet2012", image_size=256)
    config.data.crop_scale = (0.8, 1.0)  # a reconstruction model needs little crop jitter

    if "demo" in presets:
        # Fashion-MNIST at 32 px into 8x8 tokens, for a few minutes on 2 CPU cores. Each
        # choice was measured on the test split (docs/demo.md): 8-dimensional codes (all 256
        # in use; 32-dimensional ones left up to half idle), widths (1, 1, 2) (the cost of a
        # step is in the full-resolution convolutions), no entropy term (Fashion-MNIST is
        # mostly black background: spreading it evenly over the codebook wastes codes on
        # it), no GAN (it sharpens textures over many thousands of steps; in minutes it
        # costs half of every step), Adam with momentum on a cosine schedule, and whole
        # images for training and scoring (Fashion-MNIST frames each garment whole).
        config.data = config_defaults.demo_data_config()
        config.tokenizer.update(ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, z_channels=8,
                                embed_dim=8, codebook_size=256)
        # The small variant (a GAN, if turned on, must fit in minutes).
        config.discriminator.update(kind="stylegan2_mbstd", ch=16, ch_mult=(2, 4, 4))
        # No perceptual term either: it needs a weights file, which the demo cannot
        # download, and PSNR is what the demo is judged by. Turned on, it would be LPIPS:
        # the ResNet-50 losses run a ~4-GFLOP network on every image resized from 32 to
        # 224 px, many times the cost of the demo tokenizer itself.
        config.loss.update(entropy_weight=0.0, adversarial_weight=0.0, perceptual_weight=0.0,
                           perceptual_kind="lpips")
        # No EMA: the cosine schedule ends at lr 0, which settles the weights itself, and a
        # 0.999 average of 500 steps would still weigh the first, untrained ones.
        config.ema_decay = 0.0
        config.batch_size = 32
        config.total_steps = 500
        config.optimizer.update(lr=3e-3, b1=0.9, warmup_steps=20, schedule="cosine",
                                decay_steps=config.get_ref("total_steps"))
        config.log_every = 50
        config.checkpoint_every = 200
        config.image_summary_every = 200
        config.eval.num_examples = 2000
    if config_defaults.smoke_preset(presets):  # the demo, a few steps long (configs/pretrain.py)
        config.total_steps = 20
        config.update(log_every=5, checkpoint_every=10, image_summary_every=10)
        config.eval.num_examples = 64
    return config
