"""The same network in three frameworks: fit cost and agreement (one command, prints a table, writes JSON).

    python benchmarks/frameworks.py                 # 60,000 training images (about 6 min on 2 cores)
    python benchmarks/frameworks.py --n 10000       # fewer

The Fashion-MNIST CNN of the other benchmarks (trained once in PyTorch and cached) is explained three
ways with the same weights: as the PyTorch module, exported to ONNX (``torch.onnx.export``, dynamic
batch, run by onnxruntime on the CPU) and ported to Keras 3 on JAX (the first dense layer's rows
permuted for Keras's channels-last flatten). For each: one plain forward pass over the training
images in that framework (its own batch loop, no actclust), then ``fit`` over conv1, conv2, fc1, fc2
with the defaults, timed right after; fit/forward is their ratio. Against the PyTorch run: the
cosine of every layer's training vectors (the minimum over samples), the share of test inputs and
layers whose cluster agrees, the fidelity gap on the 10,000 test images, and the share of the 10
similar training samples in common for 200 test inputs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _common import RESULTS, fashion_cnn  # noqa: E402

from actclust import ActivationClustering  # noqa: E402
from actclust.datasets import load_fashion_mnist  # noqa: E402

LAYERS = ["conv1", "conv2", "fc1", "fc2"]
ONNX_LAYERS = ["/conv1/Conv_output_0", "/conv2/Conv_output_0", "/fc1/Gemm_output_0", "logits"]
BATCH = 256


def to_onnx(model, path: Path, example: np.ndarray) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.from_numpy(example),), str(path), input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}}, dynamo=False)
    return path


def to_keras(model):
    """The SmallCNN as a Keras functional model, channels-last, with the same weights."""
    import keras
    from keras import layers

    sd = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    c1, c2 = sd["conv1.weight"].shape[0], sd["conv2.weight"].shape[0]
    inp = keras.Input((28, 28, 1), name="image")
    conv1 = layers.Conv2D(c1, 3, padding="same", name="conv1")
    x = layers.MaxPooling2D(2, name="pool1")(layers.ReLU(name="relu1")(conv1(inp)))
    conv2 = layers.Conv2D(c2, 3, padding="same", name="conv2")
    x = layers.MaxPooling2D(2, name="pool2")(layers.ReLU(name="relu2")(conv2(x)))
    x = layers.Flatten(name="flatten")(x)
    fc1 = layers.Dense(sd["fc1.weight"].shape[0], name="fc1")
    x = layers.ReLU(name="relu3")(fc1(x))
    fc2 = layers.Dense(sd["fc2.weight"].shape[0], name="fc2")
    out = keras.Model(inp, fc2(x), name="fashion_cnn")
    conv1.set_weights([sd["conv1.weight"].transpose(2, 3, 1, 0), sd["conv1.bias"]])
    conv2.set_weights([sd["conv2.weight"].transpose(2, 3, 1, 0), sd["conv2.bias"]])
    w1 = sd["fc1.weight"]  # (out, C*H*W) in PyTorch's flatten order -> (H*W*C, out) in Keras's
    w1 = w1.reshape(w1.shape[0], c2, 7, 7).transpose(2, 3, 1, 0).reshape(-1, w1.shape[0])
    fc1.set_weights([w1, sd["fc1.bias"]])
    fc2.set_weights([sd["fc2.weight"].T, sd["fc2.bias"]])
    return out


def forward_torch(model, x):
    t = time.perf_counter()
    with torch.no_grad():
        for s in range(0, len(x), BATCH):
            model(torch.from_numpy(x[s:s + BATCH]))
    return time.perf_counter() - t


def forward_onnx(path, x):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    session.run(None, {"x": x[:BATCH]})  # warm-up, as the torch and Keras loops are warm
    t = time.perf_counter()
    for s in range(0, len(x), BATCH):
        session.run(None, {"x": x[s:s + BATCH]})
    return time.perf_counter() - t


def forward_keras(model, x):
    model(x[:BATCH], training=False)  # warm-up: compiles for the batch shape
    t = time.perf_counter()
    for s in range(0, len(x), BATCH):
        np.asarray(model(x[s:s + BATCH], training=False))
    return time.perf_counter() - t


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    cos = np.where((na < 1e-12) & (nb < 1e-12), 1.0, (a * b).sum(1) / np.maximum(na * nb, 1e-300))
    return float(cos.min())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=60000, help="training images fitted on")
    ap.add_argument("--out", default=str(RESULTS / "frameworks.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    import faiss  # noqa: F401  imported before the first fit, so no framework's fit pays for the imports
    import sklearn.cluster  # noqa: F401
    x_tr, y_tr, x_te, y_te = load_fashion_mnist()
    x_tr, y_tr = x_tr[:args.n], y_tr[:args.n]
    model = fashion_cnn()
    x_tr_last, x_te_last = (np.ascontiguousarray(np.moveaxis(a, 1, -1)) for a in (x_tr, x_te))
    rows, fitted = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        path = to_onnx(model, Path(tmp) / "fashion_cnn.onnx", x_tr[:2])
        keras_model = to_keras(model)
        cases = [("pytorch", model, LAYERS, x_tr, x_te, forward_torch, model),
                 ("onnx", str(path), ONNX_LAYERS, x_tr, x_te, forward_onnx, path),
                 ("keras-jax", keras_model, LAYERS, x_tr_last, x_te_last, forward_keras, keras_model)]
        for name, m, layers, train, test, forward, native in cases:
            fwd = forward(native, train)
            t = time.perf_counter()
            ac = ActivationClustering(m, layers, batch_size=BATCH, progress=False).fit(train, y_tr)
            fit_s = time.perf_counter() - t
            score = ac.score(test, y_te)
            fitted[name] = (ac, test)
            rows.append({"framework": name, "n": len(train), "forward_s": fwd, "fit_s": fit_s, "fit_over_forward": fit_s / fwd,
                         "capture_s": ac.fit_info_["seconds_capture"], "capture_over_forward": ac.fit_info_["seconds_capture"] / fwd,
                         "clustering_s": ac.fit_info_["seconds_clustering"],
                         "fidelity": score["fidelity"], "dnn_accuracy": score["dnn_accuracy"]})
            print(f"{name}: forward {fwd:.2f} s, fit {fit_s:.2f} s", file=sys.stderr)
        ref, ref_test = fitted["pytorch"]
        ref_paths = ref.cluster_paths(ref_test)
        ref_similar = ref.similar(ref_test[:200]).indices
        for row in rows:
            ac, test = fitted[row["framework"]]
            row["min_cosine"] = {l: cosine(ref.train_vectors_[l], ac.train_vectors_[o])
                                 for l, o in zip(ref.layers_, ac.layers_)}
            row["path_agreement"] = float((ac.cluster_paths(test) == ref_paths).mean())
            row["fidelity_gap"] = abs(row["fidelity"] - rows[0]["fidelity"])
            row["similar_overlap"] = float(np.mean([len(set(a) & set(b)) / 10 for a, b in
                                                    zip(ac.similar(test[:200]).indices, ref_similar)]))
    print(f"\n| framework | n | forward s | fit s | fit/forward | capture/forward | test fidelity | min cosine vs PyTorch | "
          f"cluster agreement | fidelity gap | similar overlap |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['framework']} | {r['n']:,} | {r['forward_s']:.2f} | {r['fit_s']:.2f} | {r['fit_over_forward']:.2f} | "
              f"{r['capture_over_forward']:.2f} | "
              f"{r['fidelity']:.4f} | {min(r['min_cosine'].values()):.6f} | {r['path_agreement']:.4f} | "
              f"{r['fidelity_gap']:.4f} | {r['similar_overlap']:.3f} |")
    import keras
    import onnxruntime

    out = {"rows": rows, "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                     "load_average": os.getloadavg(), "torch": torch.__version__,
                                     "onnxruntime": onnxruntime.__version__, "keras": keras.__version__,
                                     "keras_backend": keras.config.backend()}}
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
