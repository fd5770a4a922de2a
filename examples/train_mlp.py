"""Train a 2-layer MLP on a synthetic regression task with tessera_cp's tape and AdamW.

    python examples/train_mlp.py            # on the default device (the GPU when there is one)
    TESSERA_DEVICE=cpu python examples/train_mlp.py
"""
import time

import tessera_cp as tc
from tessera_cp import nn, optim


class MLP(nn.Module):
    def __init__(self, dim_in, hidden, dim_out, generator):
        super().__init__()
        self.fc1 = nn.Linear(dim_in, hidden, generator=generator)
        self.fc2 = nn.Linear(hidden, dim_out, generator=generator)

    def forward(self, x):
        return self.fc2(self.fc1(x).tanh())


def make_task(n, generator, device=None):
    """y = sin(x0) + x1 * x2: smooth and nonlinear, so a linear model cannot fit it."""
    x = tc.randn(n, 3, generator=generator, device=device)
    y = (x[:, 0].sin() + x[:, 1] * x[:, 2]).unsqueeze(1)
    return x, y


def train(steps=300, device=None, seed=0):
    """Returns (first loss, final loss on held-out data)."""
    generator = tc.Generator(seed)
    model = MLP(3, 64, 1, generator).to(device or tc.default_device())
    x, y = make_task(1024, generator, device)
    x_test, y_test = make_task(256, generator, device)
    opt = optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    first = None
    for _ in range(steps):
        loss = ((model(x) - y) ** 2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with tc.no_grad():
        test_loss = ((model(x_test) - y_test) ** 2).mean().item()
    return first, test_loss


if __name__ == "__main__":
    start = time.perf_counter()
    first, final = train()
    print(f"backend {tc.info()['backend']}: MSE {first:.3f} -> {final:.4f} on held-out data "
          f"in {time.perf_counter() - start:.1f} s")
