import base64
import struct
import zlib

import numpy as np
import pytest

from actclust.views.render import Renderer, png_data_uri


def _decode_png(uri: str) -> np.ndarray:
    """Minimal PNG reader for 8-bit grey/RGB, filter 0: checks signature, CRCs and pixels."""
    data = base64.b64decode(uri.split(",", 1)[1])
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (n,), tag = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body, (crc,) = data[pos + 8:pos + 8 + n], struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert zlib.crc32(tag + body) & 0xFFFFFFFF == crc
        chunks[tag] = body
        pos += 12 + n
    w, h, depth, color = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    channels = {0: 1, 2: 3}[color]
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(h, 1 + w * channels)
    assert depth == 8 and (raw[:, 0] == 0).all()
    return raw[:, 1:].reshape(h, w, channels).squeeze()


# the PNG encoder writes valid files holding exactly the pixels given, grey and RGB
@pytest.mark.parametrize("shape", [(5, 7), (4, 3, 3)])
def test_png_round_trip(shape):
    img = np.random.default_rng(0).integers(0, 256, shape).astype(np.uint8)
    assert np.array_equal(_decode_png(png_data_uri(img)), img)


# images: channels first or last, de-normalised with mean/std, else min-max scaled
def test_default_images():
    r = Renderer()
    out = r(np.full((1, 4, 4), 0.5, np.float32), "x")
    assert out["kind"] == "image" and out["width"] == 4 and (_decode_png(out["src"]) == 128).all()
    rgb = r(np.zeros((3, 2, 5), np.float32), "x")
    assert _decode_png(rgb["src"]).shape == (2, 5, 3)
    norm = Renderer(mean=[0.5], std=[0.25])(np.full((1, 2, 2), 2.0, np.float32), "x")
    assert (_decode_png(norm["src"]) == 255).all()  # 2 * 0.25 + 0.5 = 1
    scaled = r(np.array([[-3.0, 1.0], [5.0, 5.0]], np.float32), "x")
    assert _decode_png(scaled["src"]).tolist() == [[0, 128], [255, 255]]


# tabular rows show feature names and values; user render may return text or an image
def test_tabular_and_user_render():
    t = Renderer(feature_names=["a", "b"])(np.array([1.5, 2.0]), "x")
    assert t["kind"] == "table" and t["rows"] == [("a", "1.5"), ("b", "2")]
    assert Renderer(render=lambda x: "hello")(0, "x") == {"kind": "text", "text": "hello"}
    assert Renderer(render=lambda x: np.zeros((3, 3)))(0, "x")["kind"] == "image"


# a failing render, a bad return value or bad mean/std give a placeholder naming the input, and a warning
def test_placeholders():
    def boom(x):
        raise RuntimeError("no pixels")

    r = Renderer(render=boom)
    with pytest.warns(UserWarning, match="could not render input 7: RuntimeError: no pixels"):
        out = r(0, "input 7")
    assert out["kind"] == "error" and "input 7" in out["text"] and r.failures
    with pytest.warns(UserWarning, match="render returned int; expected a str or an image"):
        assert Renderer(render=lambda x: 3)(0, "x")["kind"] == "error"
    with pytest.warns(UserWarning, match="mean/std give 3/1 values for an image of 1 channel"):
        Renderer(mean=[0, 0, 0])(np.zeros((1, 2, 2)), "x")
    with pytest.warns(UserWarning, match=r"not an image or a feature row; pass render="):
        Renderer()(np.zeros((2, 2, 2, 2)), "x")


# a feature row longer than a table shows keeps the first 12 features, with their names, and counts the rest
def test_tabular_shows_twelve_and_counts_the_rest():
    names = [f"a_long_feature_name_{i}" for i in range(15)]
    t = Renderer(feature_names=names)(np.arange(15, dtype=np.float32) / 3, "x")
    assert [n for n, _ in t["rows"]] == names[:12] and t["rows"][1] == (names[1], "0.3333") and t["more"] == 3
    with pytest.warns(UserWarning, match="2 feature names for 3 features"):
        assert Renderer(feature_names=["a", "b"])(np.zeros(3), "x")["kind"] == "error"
    # rest=: further rows (those a page folds), in the order asked for; what is still left counted
    order = np.arange(15)[::-1]
    t = Renderer(feature_names=names)(np.arange(15, dtype=np.float32), "x", order=order, max_rows=4, rest=8)
    assert [n for n, _ in t["rows"]] == [names[j] for j in order[:4]] and t["more"] == 3
    assert [n for n, _ in t["rest"]] == [names[j] for j in order[4:12]]
    t = Renderer(feature_names=names)(np.arange(15, dtype=np.float32), "x", rest=1000)
    assert len(t["rows"]) + len(t["rest"]) == 15 and t["more"] == 0


# 100 classes get colours that can be told apart (an outside check: golden-angle hues put some 1.4 apart in CIELAB);
# the distances are measured in CIELAB, its conversion checked against published values first
def test_class_colors_apart():
    import itertools

    from actclust.views.templating import PALETTE, _lab, class_color

    ref = _lab(np.array([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))
    np.testing.assert_allclose(ref, [[100, 0, 0], [53.24, 80.09, 67.20], [32.30, 79.19, -107.86]], atol=0.05)
    colors = [class_color(c) for c in range(100)]
    assert colors[:10] == list(PALETTE) and all(len(c) == 7 and c.startswith("#") for c in colors)
    lab = _lab(np.array([[int(c[i:i + 2], 16) / 255 for i in (1, 3, 5)] for c in colors]))
    assert min(np.linalg.norm(a - b) for a, b in itertools.combinations(lab, 2)) > 10
    assert class_color(5000).startswith("hsl(")


# text: a cut text says so in the text a thumbnail's tooltip shows (it was cut at 128 tokens without a mark: an outside
# check); a Hugging Face tokenizer that has no token for an id shows [id], with a warning once (it showed "None")
def test_text_cut_and_unknown_ids():
    import warnings

    from actclust import RenderWarning

    long = Renderer(tokenizer=[f"w{i}" for i in range(300)], max_tokens=4)(np.arange(1, 11), "x")
    assert long["text"] == "w1 w2 w3 w4 … (+6 more tokens)" and long["more"] == 6

    class Small:  # a Hugging Face tokenizer's interface, of 3 tokens
        all_special_ids = []

        def __len__(self):
            return 3

        def convert_ids_to_tokens(self, ids):
            return [["a", "b", "c"][i] if i < 3 else None for i in ids]

    r = Renderer(tokenizer=Small())
    with pytest.warns(RenderWarning, match=r"The tokenizer has no token for the ids \[7, 9\] \(its vocabulary holds 3\): "
                                           r"is it the model's tokenizer\? They are shown as \[id\]"):
        out = r(np.array([1, 7, 2, 9]), "x")
    assert [w for w, _ in out["tokens"]] == ["b", "[7]", "c", "[9]"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RenderWarning)
        r(np.array([8]), "x")  # said once
