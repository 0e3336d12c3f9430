"""ONNX export of models on the kernels' device, with no extra step: the units export as standard operators,
and ONNX Runtime computes what the model computes."""
import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from sknet_triton import create_model
from tests.helpers import DEVICE
from tests.model_helpers import NUM_CLASSES, randomize_batchnorm


# An SK network and a ResNeSt, through both of torch.onnx.export's exporters (torch.export's and TorchScript's).
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")
@pytest.mark.parametrize("dynamo", [True, False], ids=["torch.export", "torchscript"])
@pytest.mark.parametrize("name", ["sknet_tiny", "resnest14d"])
def test_onnx_export_runs_in_onnx_runtime(name, dynamo, tmp_path):
    model = randomize_batchnorm(create_model(name, num_classes=NUM_CLASSES)).to(DEVICE).eval()
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        expected = model(x).cpu().numpy()  # the kernels where DEVICE runs them
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=dynamo)
    graph = onnx.load(str(path)).graph
    assert all(node.domain in ("", "ai.onnx") for node in graph.node), {node.domain for node in graph.node}
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    [logits] = session.run(None, {session.get_inputs()[0].name: x.cpu().numpy()})
    error = np.abs(logits - expected).max() / np.abs(expected).max()
    assert error < 1e-4, error
