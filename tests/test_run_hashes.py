"""Run directories keep their names: the result hash of every experiment, pinned.

A run directory is named by the hash of the settings that define its result
(bnrepro.config.resolvers.result_hash), so that re-running a command finds its finished runs
(`make reproduce-*` says "already finished"). A refactoring that changes any composed value,
adds a key or drops one changes these hashes and orphans every run made before it: this test
says so. The values were computed at commit 8355403 (fig2_small's at issue 21's redesign,
which defines new results: validation split, plateau rule, 100-step evaluations; ics's at issue
22's: Algorithm 1's noise, training accuracy, the measured step range; batch_size_conv's at
its evaluation once an epoch); change them only with a change that is meant to define new
results (and say so in its commit).
"""

from __future__ import annotations

from hydra import compose, initialize_config_dir

from bnrepro.config.resolvers import register_resolvers, result_hash

from .conftest import CONFIGS

PINNED = {
    "experiment=batch_size/grid": "cf458d28",
    "experiment=bn_stats/bn": "41bfbdc5",
    "experiment=bn_stats_large/bn": "3a586288",
    "experiment=batch_size_conv/wu_he": "d95201c0",
    "experiment=batch_size_conv/ghost": "d95201c0",  # no ghost batch: wu_he at batch 32
    "experiment=batch_size_conv/lr_search": "d95201c0",  # = wu_he's: the rate is the sweep's
    "experiment=ics/baseline": "197b934f",
    "experiment=ics/bn": "76bae88b",
    "experiment=ics/noisy_bn": "59f538dc",
    "experiment=ics/noise": "baec73de",
    "experiment=ics/lr_search": "197b934f",  # = ics/baseline's: the rate comes from the sweep
    "experiment=fig2_small/bn_baseline": "47de5d53",
    "experiment=fig2_small/bn_x30": "63467f01",
    "experiment=fig2_small/bn_x5": "b62b6e80",
    "experiment=fig2_small/bn_x5_dropout": "3138c1e5",
    "experiment=fig2_small/bn_x5_sigmoid": "ae6e9434",
    "experiment=fig2_small/inception": "1ae9c8b8",
    "experiment=fig2_small/inception_no_dropout": "567800c6",
    "experiment=fig2_small/inception_sigmoid": "32b184ee",
    "experiment=fig2_small/inception_x5": "d8feb75b",
    "experiment=fig2_small/lr_search": "1ae9c8b8",
    "experiment=imagenet/bn_baseline": "b5a29325",
    "experiment=imagenet/bn_x30": "c1b0113d",
    "experiment=imagenet/bn_x5": "50be17c8",
    "experiment=imagenet/bn_x5_sigmoid": "280810bc",
    "experiment=imagenet/inception": "16842021",
    "experiment=mnist/baseline": "180f24f8",
    "experiment=mnist/baseline seeds=[1,2,3]": "309d2e61",
    "experiment=mnist/baseline data=fashion_mnist seeds=[1,2,3,4,5]": "94c8d996",
    "experiment=mnist/baseline_x30": "fdbe0917",
    "experiment=mnist/baseline_x5": "80713752",
    "experiment=mnist/bn": "5606b714",
    "experiment=mnist/bn seeds=[1,2,3]": "098c05ac",
    "experiment=mnist/bn data=fashion_mnist seeds=[1,2,3,4,5]": "f713d27d",
    "experiment=mnist/bn_x30": "af4b9ff3",
    "experiment=mnist/bn_x5": "6cadaa8c",
    "experiment=mnist/bn_x5_relu": "3fd3bfa4",
    "experiment=mnist/grid": "180f24f8",
    "experiment=mnist/grid norm=bn": "5606b714",
    "experiment=mnist/grid norm=noisy_bn": "412094e7",
    "experiment=mnist/grid norm=batch_renorm": "29c1d7b0",
    "experiment=mnist/grid norm=batch_renorm_scaled": "562f21a8",
    "experiment=mnist/grid norm=group_norm": "6121b6b6",
    "experiment=mnist/grid norm=layer_norm": "e869a910",
    "experiment=mnist/grid norm=bn lr_mult=x30 activation=relu dropout=inception": "5126ca31",
}


def test_result_hashes_are_pinned():
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        hashes = {c: result_hash(compose("train", overrides=c.split())) for c in PINNED}
    assert {c: h for c, h in hashes.items() if h != PINNED[c]} == {}


def test_every_experiment_is_pinned():
    experiments = {
        f"experiment={p.relative_to(CONFIGS / 'experiment').with_suffix('').as_posix()}"
        for p in (CONFIGS / "experiment").rglob("*.yaml")
        if not p.name.startswith("_")
    }
    assert experiments <= set(PINNED)
