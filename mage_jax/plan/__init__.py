"""The pod planner (``python -m mage_jax.plan``): a training config compiled for a TPU slice
on this machine, reported per device. aot.py plans one config, hlo.py reads the compiled
program, search.py plans a grid of variants, topology.py names the slices and chips."""
