"""The README's code snippet imports only public modules and runs (on a 512-image slice of the shipped MNIST)."""
import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def _snippet():
    return re.search(r"```python\n(import bbits_tf\n.*?)```", README.read_text(), re.S).group(1)


def test_snippet_imports_no_private_module():
    code = _snippet()
    assert not re.search(r"\b(bbits_tf|tflite_export)\._", code), code
    keras3 = r"(?<![\w.])tf" + r"\.keras"  # TensorFlow's own Keras: Keras 3 on TF 2.21
    assert not re.search(keras3, code), "the snippet must use bbits_tf.keras (tf_keras)"


def test_snippet_runs_and_the_saved_model_reloads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = _snippet().replace("data.load_mnist()", "data.load_mnist(train_limit=512)")
    scope = {}
    exec(compile(code, str(README), "exec"), scope)  # pylint: disable=exec-used
    profile = scope["profile"]
    assert profile.relative_bops == 6.25  # one epoch cannot move a gate from +6 below its threshold
    import bbits_tf

    x = scope["x_test"][:32]
    reloaded = bbits_tf.load_model(str(tmp_path / "model.keras"))
    np.testing.assert_array_equal(reloaded.predict(x, verbose=0), scope["qmodel"].predict(x, verbose=0))
