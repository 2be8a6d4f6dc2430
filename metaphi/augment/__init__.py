"""Learned data augmentation: image operations differentiable in their magnitudes (``ops``), a
policy with relaxed and discrete sampling (``policy``), and its search by the validation loss after
a lookahead training step (``search``). Submodules are imported when used."""
