import torch

from metaphi.tasks.corrupt import flip_noise, long_tail, long_tail_counts, stratified_split, uniform_noise
from metaphi.tasks.digits import load_digits


def test_digits_ship_with_the_package_and_look_like_digits():
    data = load_digits()
    assert data.images.shape == (1797, 1, 8, 8) and data.images.dtype == torch.uint8
    assert data.num_classes == 10
    assert data.counts.tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    assert int(data.images.max()) == 255 and int(data.images.min()) == 0
    # the first image of the file is a zero: a ring of ink with an empty centre
    zero = data.images[0, 0].float()
    assert int(data.targets[0]) == 0 and zero[3:5, 3:5].mean() < zero[1:7, 1:7].mean() / 2


def test_uniform_noise_rate_and_determinism():
    labels = torch.arange(10).repeat(2000)
    noisy = uniform_noise(labels, 10, 0.4, torch.Generator().manual_seed(0))
    wrong = (noisy != labels).float().mean().item()
    assert abs(wrong - 0.4 * 9 / 10) < 0.01
    assert torch.equal(noisy, uniform_noise(labels, 10, 0.4, torch.Generator().manual_seed(0)))
    assert torch.equal(uniform_noise(labels, 10, 0.0, torch.Generator()), labels)


def test_flip_noise_moves_labels_to_the_next_class_only():
    labels = torch.arange(5).repeat(1000)
    noisy = flip_noise(labels, 5, 0.3, torch.Generator().manual_seed(1))
    changed = noisy != labels
    assert torch.equal(noisy[changed], (labels[changed] + 1) % 5)
    assert abs(changed.float().mean().item() - 0.3) < 0.02


def test_long_tail_counts_and_subset():
    assert long_tail_counts(100, 3, 100) == [100, 10, 1]
    labels = torch.arange(10).repeat_interleave(50)
    keep = long_tail(labels, 10, 10, torch.Generator().manual_seed(0))
    counts = torch.bincount(labels[keep], minlength=10).tolist()
    assert counts == long_tail_counts(50, 10, 10) and counts[0] == 50 and counts[-1] == 5
    assert keep.unique().numel() == keep.numel()


def test_stratified_split_is_disjoint_and_keeps_proportions():
    labels = torch.arange(4).repeat_interleave(torch.tensor([10, 20, 30, 40]))
    a, b = stratified_split(labels, [0.5, 0.3], torch.Generator().manual_seed(0))
    assert set(a.tolist()).isdisjoint(b.tolist())
    assert torch.bincount(labels[a]).tolist() == [5, 10, 15, 20]
    assert torch.bincount(labels[b]).tolist() == [3, 6, 9, 12]
    c, d = stratified_split(labels, [2, 3], torch.Generator().manual_seed(0))
    assert torch.bincount(labels[c]).tolist() == [2] * 4 and torch.bincount(labels[d]).tolist() == [3] * 4


def test_fractions_summing_to_one_use_every_image_once():
    labels = torch.arange(3).repeat_interleave(torch.tensor([182, 7, 9]))
    parts = stratified_split(labels, [0.5, 0.25, 0.25], torch.Generator().manual_seed(0))
    assert sum(p.numel() for p in parts) == labels.numel()
    assert torch.equal(torch.sort(torch.cat(parts)).values, torch.arange(labels.numel()))
