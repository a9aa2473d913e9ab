"""`python -m scratch_diffusion generate ...` is the same as `scratch-diffusion generate ...`."""

from scratch_diffusion.cli import main

main()
