import numpy as np
import pytest

from ltrain.data.sampler import Sampler


def test_each_epoch_is_a_permutation_and_epochs_differ():
    s = Sampler(10, seed=3)
    e0, e1 = s.take(10), s.take(10)
    assert sorted(e0) == sorted(e1) == list(range(10))
    assert not np.array_equal(e0, e1)
    assert (s.epoch, s.position) == (2, 0)


def test_take_crosses_epoch_boundaries_like_single_takes():
    a = Sampler(7, seed=1)
    b = Sampler(7, seed=1)
    chunks = np.concatenate([a.take(3) for _ in range(5)])
    assert np.array_equal(chunks, b.take(15))


def test_same_seed_same_order_other_seed_other_order():
    assert np.array_equal(Sampler(50, 0).take(50), Sampler(50, 0).take(50))
    assert not np.array_equal(Sampler(50, 0).take(50), Sampler(50, 1).take(50))


def test_state_dict_round_trip_continues_exactly():
    ref = Sampler(13, seed=5)
    full = ref.take(40)
    s = Sampler(13, seed=5)
    head = s.take(17)
    resumed = Sampler(13, seed=5)
    resumed.load_state_dict(s.state_dict())
    assert np.array_equal(np.concatenate([head, resumed.take(23)]), full)


def test_endless_stream_is_in_order():
    s = Sampler(None, seed=0)
    assert s.take(3).tolist() == [0, 1, 2]
    r = Sampler(None, seed=0)
    r.load_state_dict(s.state_dict())
    assert r.take(2).tolist() == [3, 4]


def test_load_refuses_other_sample_count():
    s = Sampler(10, seed=0)
    with pytest.raises(ValueError, match="num_samples=10"):
        Sampler(11, seed=0).load_state_dict(s.state_dict())
