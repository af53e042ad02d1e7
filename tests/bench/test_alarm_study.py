"""The benchmark's alarm study on hand-made data: attack streams alarm, benign clients do not."""

from __future__ import annotations

import torch

from sameguard.bench.alarm_study import COMBINED, STREAM, AlarmStudy, alarm_sets, median_range
from sameguard.data import ImageDataset

SHAPE = (1, 6, 6)


class Victim:
    image_shape, num_classes = SHAPE, 2

    def __call__(self, x):
        m = x.flatten(1).mean(1)
        return torch.stack([torch.sigmoid(-20 * m), torch.sigmoid(20 * m)], dim=1)


class Brightness:
    def score(self, x):
        return x.flatten(1).mean(1)


class Contrast:
    def score(self, x):
        return x.flatten(1).std(1)


def natural(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *SHAPE, generator=g) * 1.2 - 1.0


def test_alarm_study_separates_attack_streams_from_benign_clients():
    victim = Victim()
    sets = alarm_sets(["brightness", "contrast"], ["brightness", "contrast"], stream=True)
    assert list(sets) == ["brightness", "contrast", COMBINED, STREAM, "combination + stream test"]
    study = AlarmStudy(victim, {"brightness": Brightness(), "contrast": Contrast()}, natural(2000, 0), sets,
                       delta=1e-3, seed=0)
    bright = natural(200, 1) * 0.3 + 0.5            # brighter than any benign image: caught by brightness
    seeds = natural(150, 2)  # JBDA-like: natural seeds, then one small sign step from each (a new query per seed)
    steps = 0.05 * torch.sign(torch.randn(150, *SHAPE, generator=torch.Generator().manual_seed(4)))
    jbda_like = torch.cat([seeds, (seeds + steps).clamp(-1, 1)])
    alarms = study.queries_until_alarm(bright)
    assert alarms["brightness"] is not None and alarms["brightness"] <= 10
    assert alarms[COMBINED] is not None and alarms[COMBINED] <= 10
    chained = study.queries_until_alarm(jbda_like)
    assert chained[STREAM] is not None and 150 < chained[STREAM] <= 300  # not before the steps start
    images = natural(3000, 3)
    test = ImageDataset(name="toy", split="test", images=images,
                        labels=(images.flatten(1).mean(1) > -0.4).long(), classes=("dark", "bright"), hflip=False)
    benign = study.benign_false_alarms(test, clients=200, queries=100)
    for name, row in benign.items():
        assert row["clients"] == 200 and row["skewed_clients"] == 3  # classes 0, 1 and the pair
        assert row["alarmed"] <= 2, name  # bound: delta x 200 = 0.2 expected


def test_median_range_counts_never_alarmed_streams_as_longer():
    assert median_range([10, 20, 30], 500) == "20 [10–30]"
    assert median_range([10, None, None], 500) == "> 500 [10–> 500]"
    assert median_range([7], 500) == "7"
