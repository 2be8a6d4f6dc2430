"""``metaphi reweight``: plain training, Learning to Reweight Examples and Meta-Weight-Net, over seeds.

    metaphi reweight digits --noise uniform --noise-rate 0.4 --methods plain,l2rw,mwnet --out runs/rw
    metaphi reweight --config runs/rw/config.yaml --out runs/rw-again

One data set is split per class into clean test images, a few clean meta images and training images;
the training images get seeded label noise and/or a long-tailed class profile. Each seed trains the
same initial network on them with every method; the reweighting methods learn example weights from
the clean meta images, and "plain-meta" adds the meta images to the training data instead, the fair
use of the same labels. The study is ``metaphi.experiments.reweight``; this module only builds its
config.
"""
from __future__ import annotations


def register(subparsers) -> None:
    from metaphi.cli import study_command
    from metaphi.experiments import reweight

    study_command(subparsers, "reweight", reweight.ReweightConfig, reweight.main,
                  help="sample reweighting under label noise or class imbalance: plain, L2RW, Meta-Weight-Net",
                  description=__doc__.split("\n\n")[0].replace("``", ""),
                  epilog=__doc__.split("\n\n", 1)[1].replace("``", ""), raw=True)
