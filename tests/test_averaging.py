"""The warm-up EMA of the weights (crowdseg.averaging) and the warm-up cosine learning-rate factor."""
import pytest
import torch

from crowdseg.averaging import warmup_decay, warmup_ema_avg_fn


def test_warmup_decay_by_hand():
    n = torch.tensor([0, 1, 10, 90, 10_000])
    assert warmup_decay(0.99, n).tolist() == pytest.approx([0.1, 2 / 11, 11 / 20, 91 / 100, 0.99])


def test_average_step_by_hand_and_integer_buffers():
    avg = warmup_ema_avg_fn(0.99)
    out = avg(torch.tensor([0.0, 10.0]), torch.tensor([10.0, 0.0]), torch.tensor(0))
    assert out.tolist() == pytest.approx([9.0, 1.0])  # d = 0.1: 90 % of the way to the current weights
    late = avg(torch.tensor([0.0]), torch.tensor([10.0]), torch.tensor(10_000))
    assert late.tolist() == pytest.approx([0.1])      # d = decay = 0.99
    counter = avg(torch.tensor(3), torch.tensor(7), torch.tensor(5))
    assert counter.item() == 7 and counter.dtype == torch.int64


def test_averaged_model_with_the_warmup_tracks_early_weights():
    """After 20 updates of a weight moving 0 -> 19, the warm-up average is far closer to the live value
    than a plain 0.99 EMA (which still holds ~82 % of the initial 0)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn

    live = torch.nn.Linear(1, 1, bias=False)
    warm = AveragedModel(live, avg_fn=warmup_ema_avg_fn(0.99), use_buffers=True)
    plain = AveragedModel(live, avg_fn=get_ema_avg_fn(0.99), use_buffers=True)
    for step in range(20):
        with torch.no_grad():
            live.weight.fill_(float(step))
        warm.update_parameters(live)
        plain.update_parameters(live)
    assert warm.module.weight.item() > 10 > 2 > plain.module.weight.item()


def test_bad_decay():
    with pytest.raises(ValueError, match="decay"):
        warmup_ema_avg_fn(1.0)


def test_warmup_cosine_by_hand():
    from crowdseg.optim import warmup_cosine

    assert [warmup_cosine(s, 4, 14) for s in (0, 3)] == pytest.approx([0.2, 0.8])
    assert [warmup_cosine(s, 4, 14) for s in (4, 9, 14, 20)] == pytest.approx([1.0, 0.5, 0.0, 0.0])
    assert warmup_cosine(0, 0, 10) == 1.0


def test_the_average_function_pickles():
    """ddp_spawn pickles the Trainer's callbacks, the EMA's avg_fn among them."""
    import pickle

    avg = pickle.loads(pickle.dumps(warmup_ema_avg_fn(0.99)))
    a, c = torch.zeros(3), torch.ones(3)
    assert torch.allclose(avg(a, c, torch.tensor(0)), torch.full((3,), 0.9))  # d = 1/10 at the first update
