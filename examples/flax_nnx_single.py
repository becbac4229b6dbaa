"""The Flax MNIST tutorial (nnx) on Fashion-MNIST: a CNN with BatchNorm and Dropout, nnx.MultiMetric.

`flax_nnx_single.py` is the plain single-process program; `flax_nnx.py` is the
same program on a 2-worker sync jaxps ParameterServer. `diff` them to see what
jaxps needs.

    python examples/flax_nnx_single.py
    python examples/flax_nnx.py --transport multiprocessing    # or inprocess, ray
"""

import argparse
import os
import sys
from functools import partial

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import datasets  # noqa: E402  (examples/datasets.py: real MNIST / Fashion-MNIST files)


class CNN(nnx.Module):
    """A simple CNN model."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 32, kernel_size=(3, 3), rngs=rngs)
        self.batch_norm1 = nnx.BatchNorm(32, rngs=rngs)
        self.dropout1 = nnx.Dropout(rate=0.025, rngs=rngs)
        self.conv2 = nnx.Conv(32, 64, kernel_size=(3, 3), rngs=rngs)
        self.batch_norm2 = nnx.BatchNorm(64, rngs=rngs)
        self.avg_pool = partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
        self.linear1 = nnx.Linear(3136, 256, rngs=rngs)
        self.dropout2 = nnx.Dropout(rate=0.025, rngs=rngs)
        self.linear2 = nnx.Linear(256, 10, rngs=rngs)

    def __call__(self, x):
        x = self.avg_pool(nnx.relu(self.batch_norm1(self.dropout1(self.conv1(x)))))
        x = self.avg_pool(nnx.relu(self.batch_norm2(self.conv2(x))))
        x = x.reshape(x.shape[0], -1)  # flatten
        x = nnx.relu(self.dropout2(self.linear1(x)))
        return self.linear2(x)


def loss_fn(model: CNN, batch):
    logits = model(batch["image"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits=logits, labels=batch["label"]).mean()
    return loss, logits


@nnx.jit
def train_step(model: CNN, optimizer: nnx.Optimizer, metrics: nnx.MultiMetric, batch):
    """Train for a single step."""
    grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
    (loss, logits), grads = grad_fn(model, batch)
    metrics.update(loss=loss, logits=logits, labels=batch["label"])  # in-place updates
    optimizer.update(model, grads)  # in-place updates


@nnx.jit
def eval_step(model: CNN, metrics: nnx.MultiMetric, batch):
    loss, logits = loss_fn(model, batch)
    metrics.update(loss=loss, logits=logits, labels=batch["label"])  # in-place updates


def new_metrics():
    return nnx.MultiMetric(accuracy=nnx.metrics.Accuracy(), loss=nnx.metrics.Average("loss"))


def train(model, optimizer, batches):
    """Trains on `batches`; returns the training metrics."""
    model.train()  # switch to train mode: Dropout on, BatchNorm on batch statistics
    metrics = new_metrics()
    for batch in batches:
        train_step(model, optimizer, metrics, batch)
    return metrics


def evaluate(model, images, labels, batch_size=1000):
    model.eval()  # switch to eval mode: Dropout off, BatchNorm on running statistics
    metrics = new_metrics()
    for i in range(0, len(labels), batch_size):
        eval_step(model, metrics, {"image": to_inputs(images[i : i + batch_size]), "label": labels[i : i + batch_size]})
    return metrics.compute()


def to_inputs(images):
    return images.astype(np.float32)[..., None] / 255.0


def rounds(images, labels, batch_size, steps, eval_every, seed):
    """Lists of `eval_every` shuffled batches (dicts of numpy arrays), `steps` batches in all."""
    rng, order = np.random.default_rng(seed), np.zeros(0, np.int64)
    for start in range(0, steps, eval_every):
        batches = []
        for _ in range(min(eval_every, steps - start)):
            if len(order) < batch_size:
                order = rng.permutation(len(labels))
            idx, order = order[:batch_size], order[batch_size:]
            batches.append({"image": to_inputs(images[idx]), "label": labels[idx]})
        yield start + len(batches), batches


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1200, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=64, help="examples per optimizer step")
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--lr", type=float, default=0.005)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--dataset", default="fashion_mnist", choices=datasets.DATASETS)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--test-limit", type=int, default=None)
    args = p.parse_args(argv)
    data = datasets.load(args.dataset, args.data_dir, args.train_limit, args.test_limit)

    model = CNN(rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(args.lr, args.momentum), wrt=nnx.Param)

    history = []
    for step, batches in rounds(data.train_images, data.train_labels, args.batch_size, args.steps, args.eval_every, seed=0):
        metrics = train(model, optimizer, batches)
        train_metrics, test_metrics = metrics.compute(), evaluate(model, data.test_images, data.test_labels)
        history.append({"step": step, **{f"train_{k}": float(v) for k, v in train_metrics.items()},
                        **{f"test_{k}": float(v) for k, v in test_metrics.items()}})  # fmt: skip
        print(f"step {step:5d}  train loss {history[-1]['train_loss']:.4f} accuracy {history[-1]['train_accuracy']:.2%}"
              f"  test loss {history[-1]['test_loss']:.4f} accuracy {history[-1]['test_accuracy']:.2%}", flush=True)  # fmt: skip
    return history


if __name__ == "__main__":
    main()
