"""Stage `pretrain`: MAGE (and MAGE-C) pretraining, the main job.

Arguments (comma separated):
  vit_b        ViT-B encoder (768/12/12), decoder 768/8/16, ImageNet 256 px (the default)
  vit_l        ViT-L encoder (1024/24/16), decoder 1024/8/16
  contrastive  MAGE-C: two views, projection MLP and InfoNCE on the pooled encoder output
  demo         Fashion-MNIST at CPU size; trains the demo tokenizer first if needed
  smoke        with demo: every part of the demo run, a few steps of each (about a
               minute on 2 cores): to check an installation or a notebook, not to learn
  class_conditional
               fine-tune a pretrained MAGE (--config.init_from=RUN) into a class-conditional
               one: the class id at position 0, [C0] with probability 0.1 (our design)

    python -m mage_jax.main --config=configs/pretrain.py:demo --workdir=/tmp/mage
"""
import importlib.util
import os

import ml_collections

from mage_jax import config_defaults

IMAGENET_TRAIN_EXAMPLES = 1_281_167
FASHION_MNIST_TRAIN_EXAMPLES = 60_000


def _stage_config(stage: str, arg: str) -> ml_collections.ConfigDict:
    """configs/<stage>.py's config (the tokenizer this MAGE reads, the sampling after it)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{stage}.py")
    spec = importlib.util.spec_from_file_location(f"mage_jax_{stage}_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    presets = config_defaults.parse_args(
        arg, known=("vit_b", "vit_l", "contrastive", "demo", "class_conditional", "smoke"))
    demo = "demo" in presets
    smoke = config_defaults.smoke_preset(presets)
    config = config_defaults.base_config("pretrain")

    # The frozen tokenizer. `tokenizer_workdir` is a tokenizer run of this project or the
    # output of `python -m mage_jax.convert tokenizer` (official weights). Empty means
    # <workdir>/tokenizer; with `train_tokenizer_if_missing` the stage trains it there first
    # with `tokenizer_stage` (the demo's route to a one-command start).
    tokenizer_stage = _stage_config("tokenizer", ("demo,smoke" if smoke else "demo") if demo
                                    else "paper")
    config.tokenizer_workdir = ""
    config.train_tokenizer_if_missing = demo
    config.tokenizer_stage = tokenizer_stage
    config.tokenizer = tokenizer_stage.tokenizer
    config.sample_when_done = False  # the demo samples from the model once it is trained

    config.model = ml_collections.ConfigDict(dict(
        embed_dim=768, depth=12, num_heads=12,
        decoder_embed_dim=768, decoder_depth=8, decoder_num_heads=16,
        mlp_ratio=4.0,
        dropout_rate=0.1,       # the official code's dropout and attention dropout
        dtype="float32",        # compute dtype; "bfloat16" keeps float32 params and optimizer
        remat=False,            # rematerialise each block in the backward pass
        scan_layers=False,      # nn.scan over blocks: one compiled block, faster compiles
        # A hand-written LayerNorm backward (mage_jax/models/layer_norm.py): the same function
        # and parameters; XLA:CPU's own backward is slow (ViT-B step 1.24x in a short run),
        # and the ViT-B and ViT-L v5p plans are not worse (benchmarks/README.md).
        explicit_layer_norm_grad=True,
        # jax.nn.dot_product_attention (cuDNN flash attention on NVIDIA GPUs). It has no
        # attention dropout: training with it needs dropout_rate=0 (the paper uses 0.1).
        fused_attention=False,
        # Dropout masks four per threefry hash (mage_jax/models/dropout.py): the ViT-B step
        # 1.2x faster on XLA:CPU, where drawing random numbers is what dropout costs; off in
        # every preset because on TPU flax's per-element masks fuse into their consumers
        # (ViT-L bf16 v5p plan: 323 vs 374 GB of HBM traffic). --config.model.packed_dropout=True
        # on CPUs (benchmarks/compare_official.py sets it for ours).
        packed_dropout=False,
    ))
    # Masking ratios from a truncated normal. The official trainer draws one per GPU and
    # step for its 64 examples (numpy seeded with seed + rank): here one per group of
    # examples_per_ratio consecutive examples of the global batch, whatever the mesh
    # (1: one per example; 0: one for the whole batch), and the loss averages the groups'
    # masked means as DDP averages the GPUs' (mage_jax/masking.py).
    config.masking = ml_collections.ConfigDict(dict(
        min_ratio=0.5, max_ratio=1.0, mean=0.55, std=0.25,
        drop_ratio=0.5,         # ceil(L * 0.5) positions never reach the encoder
        examples_per_ratio=64,
    ))
    config.label_smoothing = 0.1
    # Fine-tuning: a pretraining run or converted weights whose MAGE this run starts from
    # (its tokenizer too, unless tokenizer_workdir says otherwise). Empty: from scratch.
    config.init_from = ""
    # Class-conditional MAGE (not in the paper; our design): position 0 holds the class id
    # (the legacy vocabulary's class slots, 999 of them beside [C0]) instead of [C0], except
    # with probability label_dropout, so one model samples with and without a class and
    # classifier-free guidance can mix the two (configs/generate.py).
    config.class_conditional = ml_collections.ConfigDict(dict(
        enabled="class_conditional" in presets,
        label_dropout=0.1,
        num_classes=1000,
    ))
    # MAGE-C. The paper's appendix values were not available: a 2-layer MLP projection,
    # temperature 0.2 and loss weight 0.1 are our defaults (SimCLR/MoCo v3 practice).
    config.contrastive = ml_collections.ConfigDict(dict(
        enabled="contrastive" in presets,
        weight=0.1,
        temperature=0.2,
        proj_layers=2,
        proj_hidden_dim=2048,
        proj_dim=256,
    ))
    # The paper's optimisation: AdamW (0.9, 0.95), wd 0.05, lr = blr * batch / 256,
    # 40 warm-up epochs then cosine to 0 at 1600 epochs, clip 3.0, batch 4096.
    config.optimizer = ml_collections.ConfigDict(dict(
        blr=1.5e-4, b1=0.9, b2=0.95, weight_decay=0.05,
        warmup_epochs=40.0, epochs=1600.0, grad_clip_norm=3.0,
    ))
    # Evaluators during training (mage_jax/evaluators.py): {name: {type, every, ...}}, run on
    # the training mesh every `every` steps and at the last step, logged as <name>/<key>.
    config.evals = ml_collections.ConfigDict()
    config.num_train_examples = IMAGENET_TRAIN_EXAMPLES
    config.batch_size = 4096
    config.data = config_defaults.data_config("imagenet2012", image_size=256)
    config.log_every = 100
    config.checkpoint_every = 2000

    if "vit_l" in presets:
        config.model.update(embed_dim=1024, depth=24, num_heads=16,
                            decoder_embed_dim=1024, decoder_depth=8, decoder_num_heads=16)
    if demo:
        # Whole images, not ImageNet's crops of (0.2, 1) of the area: a fifth of a 28 px
        # garment enlarged to 32 px is a blur whose tokens the demo tokenizer never saw, and
        # in minutes of training MAGE learns much faster without them (docs/demo.md).
        config.data = config_defaults.demo_data_config()
        config.model.update(embed_dim=128, depth=4, num_heads=4, decoder_embed_dim=128,
                            decoder_depth=2, decoder_num_heads=4, dropout_rate=0.0)
        config.contrastive.update(proj_hidden_dim=256, proj_dim=64)
        if config.contrastive.enabled:
            # MAGE-C's two views need more than a flip and colour to differ: crops of (0.6, 1)
            # of the area. With them 2000 steps gave an encoder that probes above a random
            # one, where plain MAGE does not (docs/demo.md).
            config.data.crop_scale = (0.6, 1.0)
        config.num_train_examples = FASHION_MNIST_TRAIN_EXAMPLES
        # 1875 steps per epoch at batch 32: warm up for 28 steps, cosine to 0 at 2000.
        # Measured on the demo tokenizer (docs/demo.md): lr 3e-3 beat 1e-3 and 5e-3, and
        # steps of 32 beat half as many steps of 64 for the same images and time; 2000
        # steps rather than 1000 bring the samples' Frechet distance from about half-way
        # between real images and random tokens to a fifth of the way.
        config.batch_size = 32
        config.total_steps = 2000
        # The cosine ends with the run: --config.total_steps or --config.batch_size move it.
        config.optimizer.update(blr=2.4e-2, warmup_epochs=0.015)
        config.optimizer.epochs = ((config.get_ref("total_steps") * config.get_ref("batch_size"))
                                   .to_float() / FASHION_MNIST_TRAIN_EXAMPLES)
        config.log_every = 50
        config.checkpoint_every = 500
        config.image_summary_every = 500
        config.eval.num_examples = 500
        # Then sample from the trained model (configs/generate.py:demo, fewer samples) and
        # measure the samples offline, into <workdir>/generate (mage_jax/main.py).
        config.sample_when_done = True
        config.generate_stage = _stage_config("generate", "demo")
        config.generate_stage.num_samples = 400
        config.generate_stage.classifier_measures.train_steps = 150  # ~17 s, once per machine
        # The representation and the samples as training goes (a few seconds each time):
        # few-shot on 500 training and 500 test images, 36 samples of 8 steps, at steps
        # 1000 and 2000.
        fewshot = _stage_config("fewshot", "demo").fewshot
        fewshot.update(datasets={"fashion_mnist": ("train[:500]", "test[:500]")}, seeds=2)
        config.evals.fewshot = ml_collections.ConfigDict(dict(type="fewshot", every=1000,
                                                              **fewshot.to_dict()))
        config.evals.samples = ml_collections.ConfigDict(dict(
            type="samples", every=1000, num_samples=36, num_steps=8, choice_temperature=4.5,
            num_classes=10, classifier_train_steps=150,
            classifier_cache_dir=""))  # "": beside the TFDS data
    if "class_conditional" in presets:
        # ImageNet's 1000 classes do not fit the 999 free class ids: the stage says so
        # before compiling; a dataset of up to 999 classes sets num_classes.
        # A short fine-tune on the pretrained weights: warm-up, then cosine to 0.
        if demo:
            # Its samples: every class in turn, with guidance.
            config.generate_stage.sampling.update(class_label=-2, num_classes=10,
                                                  guidance_scale=1.0)
            config.class_conditional.num_classes = 10
            config.total_steps = 300  # the demo's cosine follows it to 300 steps
            config.optimizer.update(blr=1.2e-2, warmup_epochs=0.005)
            config.checkpoint_every = 100
            config.image_summary_every = 100
        else:
            config.optimizer.update(warmup_epochs=5.0, epochs=100.0)
    if smoke:
        config.total_steps = 20  # and with it the demo's cosine
        config.update(log_every=5, checkpoint_every=10, image_summary_every=10)
        config.eval.num_examples = 64
        config.generate_stage.update(num_samples=16, batch_size=16)
        config.generate_stage.classifier_measures.train_steps = 20
        config.evals.fewshot.update(every=10, shots=(1, 5),
                                    datasets={"fashion_mnist": ("train[:200]", "test[:100]")})
        config.evals.samples.update(every=10, num_samples=8, num_steps=4,
                                    classifier_train_steps=20)
    # When the tokenizer is trained first, it reads this config's dataset and image size and
    # uses this config's `tokenizer` sizes (mage_jax/train/pretrain.py: tokenizer_stage_config).
    if not demo:
        steps_per_epoch = config.num_train_examples // config.batch_size
        config.total_steps = int(config.optimizer.epochs * steps_per_epoch)
    return config
