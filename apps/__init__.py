"""The app layer: the ``synth`` command line and one module per Hydra job (render, pretrain, transfer, demo,
experiment), with every config-store registration. Like torchvision's ``references/``, nothing below imports it."""
