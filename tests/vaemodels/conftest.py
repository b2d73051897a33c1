"""Small real data for model tests: scikit-learn's bundled 8x8 digits, scaled to [0, 1]."""
import pytest
import torch
from sklearn.datasets import load_digits


@pytest.fixture(scope="session")
def digits_batch() -> dict[str, torch.Tensor]:
    """A fixed batch of 256 real digits: image float 256x1x8x8 in [0, 1], label long 256."""
    digits = load_digits()
    images = torch.tensor(digits.images[:256] / 16.0, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(digits.target[:256], dtype=torch.long)
    return {"image": images, "label": labels}


def train_steps(model, batch, steps: int, lr: float = 1e-3) -> list[float]:
    """Plain Adam steps on one batch (one optimizer per param group); returns the loss per step."""
    torch.manual_seed(0)
    optimizers = {name: torch.optim.Adam(params, lr=lr) for name, params in model.param_groups().items()}
    history = []
    for step in range(steps):
        model.set_training_step(step)
        out = model.loss(batch)
        for opt in optimizers.values():
            opt.zero_grad()
        out["loss"].backward()
        for opt in optimizers.values():
            opt.step()
        history.append(out["loss"].item())
    return history
