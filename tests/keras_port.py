"""The test suite's PyTorch ``TinyCNN`` ported to Keras with the same weights (used in-process on JAX and
in a subprocess on Keras's PyTorch backend by ``test_keras.py``).

Run as a script (``KERAS_BACKEND=torch python tests/keras_port.py``, or ``tensorflow`` in an environment
that has it), it prints as JSON the Keras adapter's logits and auto-reduced vectors of the port on fixed
inputs, and the port's fingerprint, to compare across backends.
"""

import json
import os
import sys

import numpy as np

LAYERS = ["conv", "fc1", "fc2"]


def port(torch_model):
    """A Keras functional model computing what ``TinyCNN`` computes, channels-last: conv -> ReLU -> pool ->
    flatten -> fc1 -> ReLU -> fc2. The first dense layer's rows are permuted, since Keras flattens (H, W, C)
    where PyTorch flattens (C, H, W)."""
    import keras
    from keras import layers

    sd = {k: v.detach().cpu().numpy() for k, v in torch_model.state_dict().items()}
    c_out, c_in, kh, kw = sd["conv.weight"].shape
    inp = keras.Input((6, 6, c_in), name="image")
    conv = layers.Conv2D(c_out, (kh, kw), padding="same", name="conv")
    x = layers.ReLU(name="relu")(conv(inp))
    x = layers.AveragePooling2D(3, name="pool")(x)  # AdaptiveAvgPool2d(2) on 6x6: 3x3 cells
    x = layers.Flatten(name="flat")(x)
    fc1 = layers.Dense(sd["fc1.weight"].shape[0], name="fc1")
    x = layers.ReLU(name="act")(fc1(x))
    fc2 = layers.Dense(sd["fc2.weight"].shape[0], name="fc2")
    model = keras.Model(inp, fc2(x), name="tiny_cnn")
    conv.set_weights([sd["conv.weight"].transpose(2, 3, 1, 0), sd["conv.bias"]])
    w1 = sd["fc1.weight"]  # (out, C*H*W) in PyTorch's order -> (H*W*C, out) in Keras's
    w1 = w1.reshape(w1.shape[0], c_out, 2, 2).transpose(2, 3, 1, 0).reshape(-1, w1.shape[0])
    fc1.set_weights([w1, sd["fc1.bias"]])
    fc2.set_weights([sd["fc2.weight"].T, sd["fc2.bias"]])
    return model


def inputs(n=600, seed=1):
    """``(x NCHW, x NHWC)``: the same random 6x6 images in PyTorch's and Keras's layouts."""
    x = np.random.default_rng(seed).standard_normal((n, 1, 6, 6)).astype(np.float32)
    return x, np.ascontiguousarray(np.moveaxis(x, 1, -1))


def keras_vectors(model, x):
    """``(logits, {layer: auto-reduced vector})`` of the Keras adapter on ``x``."""
    from actclust import KerasAdapter
    from actclust.capture.reduction import make_reducer

    with KerasAdapter(model).runner({l: make_reducer("auto") for l in LAYERS}) as runner:
        return runner.run(x, "x")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    from conftest import TinyCNN

    import keras

    import actclust

    model = port(TinyCNN(seed=3, bias=False))
    logits, out = keras_vectors(model, inputs(64)[1])
    print(json.dumps({"backend": keras.config.backend(), "adapter": type(actclust.adapt(model)).__name__,
                      "fingerprint": actclust.model_fingerprint(model),
                      "logits": logits.tolist(), "vectors": {k: v.tolist() for k, v in out.items()}}))
