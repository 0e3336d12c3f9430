"""Helpers shared by the model and conversion tests."""
import torch
from torch import Tensor, nn

from sknet_triton import FusedSplitAttn, SKConv

# The modules that run an SK unit's fuse and select: SK networks' and ResNeSts'.
SK_UNITS = (SKConv, FusedSplitAttn)


# The batch of a training step whose gradients are judged. An SK unit's attention normalises [B, d, 1, 1] with
# training-mode BatchNorm, which over two images gives +-1 whatever its input: the gradient reaching fc_reduce
# is then eps's residue, a cancellation that no relative bound judges (float32 errors of 3e-4 on some
# machines). From four images on it is as well conditioned as every other gradient.
TRAINING_BATCH = 4
# The classifier width of the models the tests build, and the model that runs the kernels through Triton's
# interpreter (the others run the "torch" backend, which keeps the interpreter cheap).
NUM_CLASSES = 10
SMALL_MODEL = "sknet_tiny"


# timm's names (and so sknet_triton's) of the BatchNorm that ends each bottleneck's residual branch.
RESIDUAL_END_BATCHNORMS = ("bn3", "conv3.bn")


def randomize_batchnorm(model: nn.Module) -> nn.Module:
    """Give every BatchNorm random affine parameters and running statistics, so that eval-mode outputs
    depend on all of them; returns ``model``. The BatchNorm ending each residual branch gets a small scale,
    as trained networks keep it: else a deep random network (200 layers) grows its activations block by block
    until float32 rounding alone differs between two batch sizes by more than any tolerance."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight.uniform_(*((0.1, 0.3) if name.endswith(RESIDUAL_END_BATCHNORMS) else (0.5, 1.5)))
                module.bias.uniform_(-0.5, 0.5)
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return model


def assert_close_relative(actual: Tensor, expected: Tensor, rtol: float = 1e-4, name: str = "") -> None:
    """Equal within ``rtol`` of each value, or of the largest value of ``expected`` for values near zero.
    ``name`` prefixes the failure message."""
    torch.testing.assert_close(
        actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item(), msg=lambda message: f"{name}: {message}"
    )


def assert_as_accurate_as(actual: Tensor, baseline: Tensor, exact: Tensor, name: str = "") -> None:
    """``actual``'s largest error against ``exact`` (a float64 computation) is at most twice that of
    ``baseline`` (the same computation in plain float32 PyTorch), plus float32 rounding of the largest value.

    For quantities whose float32 rounding is amplified (gradients through training-mode BatchNorm over a
    small batch), where comparing two float32 computations to each other says little.
    """
    exact = exact.double()
    scale = exact.abs().max().item()
    error = (actual.double() - exact).abs().max().item()
    baseline_error = (baseline.double() - exact).abs().max().item()
    allowed = 2 * baseline_error + 1e-6 * scale
    assert error <= allowed, f"{name}: error {error:.3g} against float64, float32 PyTorch's {baseline_error:.3g}"


def assert_grads_as_accurate_as(grads: dict, baseline: dict, exact: dict, factor: float = 10.0) -> None:
    """Every gradient in ``grads`` is within ``factor`` times the model's float32 accuracy of ``exact``
    (float64), where that accuracy is the largest relative error of any ``baseline`` gradient (plain float32
    PyTorch).

    Through training-mode BatchNorm over a small batch, float32 rounding is amplified differently in every
    parameter, so one parameter's baseline error says little about another's; the model-wide worst case
    does. A wrong gradient is off by its own magnitude, far beyond this bound. Training steps need batches
    of :data:`TRAINING_BATCH` images, else the attention's gradients are not conditioned for any bound.
    """

    def relative(actual, expected):
        expected = expected.double()
        return (actual.double() - expected).abs().max().item() / max(expected.abs().max().item(), 1e-30)

    accuracy = max(relative(baseline[key], exact[key]) for key in exact)
    for key, grad in grads.items():
        error = relative(grad, exact[key])
        assert error <= factor * accuracy + 1e-6, (
            f"{key}: relative error {error:.3g} against float64, float32 PyTorch's worst {accuracy:.3g}"
        )


def count_sk_units(model: nn.Module) -> int:
    """The SK units (SKConv, FusedSplitAttn) of ``model``."""
    return sum(isinstance(module, SK_UNITS) for module in model.modules())


def batchnorm_folds(model: nn.Module) -> int:
    """How many BatchNorms an eval-mode fx graph of ``model`` folds into the ops: each SKConv path's, and
    each FusedSplitAttn's bn0."""
    return sum(module.num_paths if isinstance(module, SKConv) else 1
               for module in model.modules() if isinstance(module, SK_UNITS))
