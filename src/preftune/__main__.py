"""``python -m preftune``: what torchrun launches (``torchrun --nproc_per_node N -m preftune train CONFIG``)."""

from preftune.cli import main

if __name__ == "__main__":
    main()
