"""verify(): numbers against a float64 reference, thresholds per kind/format, failures naming the
artifact and its numbers."""
import numpy as np
import pytest

from toolchain.errors import ConfigError, DataError, VerificationError
from toolchain.verify import (DEFAULT_THRESHOLDS, FORMAT_KINDS, Thresholds, compare, thresholds_for,
                              thresholds_from_dict, thresholds_from_recipe, verify)


def test_compare_numbers_are_exact():
    ref = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.5, 0.4, 0.1]])
    out = ref.copy()
    out[3] = [0.4, 0.5, 0.1]  # flips sample 3's decision
    labels = np.array([0, 1, 2, 1])
    c = compare("tflite-int8", "x.tflite", out, ref, labels, Thresholds(min_agreement=0.5))
    assert c.agreement == 0.75
    assert c.accuracy == 1.0 and c.reference_accuracy == 0.75
    assert c.max_abs_diff == pytest.approx(0.1)
    assert c.mean_abs_diff == pytest.approx(0.2 / 12)
    assert c.passed


def test_compare_names_what_failed_and_where():
    ref = np.full((10, 4), 0.25)
    out = ref.copy()
    out[7, 2] += 0.5
    c = compare("tflite-fp32", "m.tflite", out, ref, np.zeros(10, int), DEFAULT_THRESHOLDS["fp32"])
    assert not c.passed
    assert any("max |diff| 0.5 > 0.0001" in f and "1 of 40" in f and "sample 7 class 2" in f for f in c.failures)


def test_non_finite_outputs_fail():
    ref = np.full((3, 2), 0.5)
    out = ref.copy()
    out[1, 0] = np.nan
    c = compare("onnx-int8", "m.onnx", out, ref, np.zeros(3, int), DEFAULT_THRESHOLDS["int8"])
    assert c.failures == ("1 non-finite outputs",)


def test_thresholds_precedence_format_over_kind_over_default():
    kind = Thresholds(min_agreement=0.5)
    fmt = Thresholds(min_agreement=0.6)
    assert thresholds_for("tflite-int8") == DEFAULT_THRESHOLDS["int8"]
    assert thresholds_for("tflite-int8", {"int8": kind}) == kind
    assert thresholds_for("tflite-int8", {"int8": kind, "tflite-int8": fmt}) == fmt
    assert thresholds_for("onnx-int8", {"tflite-int8": fmt}) == DEFAULT_THRESHOLDS["int8"]
    assert set(FORMAT_KINDS.values()) <= set(DEFAULT_THRESHOLDS)


def test_thresholds_from_dict_starts_from_defaults_and_reports_all_problems():
    t = thresholds_from_dict({"int8": {"min_agreement": 0.95}, "tflite-fp16": {"max_abs_diff": None}})
    assert t["int8"].min_agreement == 0.95
    assert t["int8"].max_mean_abs_diff == DEFAULT_THRESHOLDS["int8"].max_mean_abs_diff
    assert t["tflite-fp16"].max_abs_diff is None
    with pytest.raises(ConfigError) as e:
        thresholds_from_dict({"int9": {}, "fp32": {"min_agreemnt": 1}})
    assert "int9" in str(e.value) and "min_agreemnt" in str(e.value)


class _Dataset:
    name = "toy"

    def __init__(self, x_eval, y_eval):
        self.x_eval, self.y_eval = x_eval, y_eval


def test_dataset_without_eval_split_is_refused():
    with pytest.raises(DataError, match="evaluation split"):
        verify([], None, _Dataset(None, None))


def test_unknown_threshold_keys_are_refused():
    with pytest.raises(ConfigError, match="int9"):
        verify([], None, _Dataset(np.zeros((1, 2, 2, 1), np.float32), np.zeros(1, int)),
               thresholds={"int9": Thresholds(0.5)})


def test_max_diff_limit_scales_with_the_outputs():
    """Outputs in tens: float rounding (1e-3 at 50) passes fp32 although it exceeds the absolute
    1e-4 a softmax is held to; a real change (0.1) still fails, naming the recipe key."""
    rng = np.random.default_rng(0)
    ref = 50.0 + rng.normal(size=(20, 3))
    targets = ref + 0.5 * rng.normal(size=ref.shape)
    ok = compare("tflite-fp32", "m.tflite", ref + 1e-3, ref, targets, DEFAULT_THRESHOLDS["fp32"], task="regression")
    assert ok.passed, ok.failures
    bad = ref.copy()
    bad[4, 1] += 0.1
    c = compare("tflite-fp32", "m.tflite", bad, ref, targets, DEFAULT_THRESHOLDS["fp32"], task="regression")
    assert len(c.failures) == 1 and "sample 4 output 1" in c.failures[0]
    assert c.failures[0].endswith("(verify.fp32.max_rel_diff)")


def test_regression_is_judged_by_its_error_not_by_classes():
    rng = np.random.default_rng(1)
    targets = rng.normal(size=(50, 4))
    ref = targets + 0.1 * rng.normal(size=targets.shape)  # Keras model: MSE ~0.01
    # near-equal outputs: argmax "agreement" would be poor, the error is what matters
    close = ref + 0.002 * rng.normal(size=ref.shape)
    c = compare("tflite-int8", "m.tflite", close, ref, targets, DEFAULT_THRESHOLDS["int8"], task="regression")
    assert c.passed, c.failures
    assert np.isnan(c.agreement) and np.isnan(c.accuracy)
    assert c.reference_metrics["mse"] == pytest.approx(np.mean((ref - targets) ** 2))
    worse = targets + np.sqrt(1.5) * (ref - targets)  # 50% more squared error
    c = compare("tflite-int8", "m.tflite", worse, ref, targets, DEFAULT_THRESHOLDS["int8"], task="regression")
    assert [f for f in c.failures if f.startswith("MSE increase 50.0% > 0.25")], c.failures
    assert c.failures[-1].endswith("(verify.int8.max_mse_increase)") and "mse" in c.summary()


def test_autoencoder_with_anomaly_labels_is_judged_by_auc():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(40, 5))
    anomaly = np.repeat([0, 1], 20)
    ref = x + np.where(anomaly[:, None] == 1, 1.0, 0.1) * rng.normal(size=x.shape)  # anomalies reconstruct badly
    t = Thresholds(min_agreement=1.0, max_auc_drop=0.05)
    assert compare("tflite-int8", "m", ref, ref, x, t, task="autoencoder", anomaly=anomaly).metrics["auc"] > 0.95
    shuffled = x + (ref - x)[rng.permutation(40)]  # errors no longer follow the labels
    c = compare("tflite-int8", "m", shuffled, ref, x, t, task="autoencoder", anomaly=anomaly)
    assert c.failures and c.failures[-1].startswith("AUC drop") and "verify.int8.max_auc_drop" in c.failures[-1]


def test_thresholds_from_recipe_and_failure_message_name_recipe_keys():
    from toolchain.verify import VerificationFailed, VerifyReport

    t = thresholds_from_recipe({"min_agreement": 0.8, "max_accuracy_drop": 0.1,
                                "fp32": {"max_rel_diff": 1e-3}, "mixed": {"min_agreement": 0.5}})
    assert t["int8"].min_agreement == 0.8 and t["int8"].max_accuracy_drop == 0.1
    assert t["mixed"].min_agreement == 0.5 and t["mixed"].max_accuracy_drop == 0.1  # nested wins
    assert t["fp32"].max_rel_diff == 1e-3 and t["fp32"].min_agreement == DEFAULT_THRESHOLDS["fp32"].min_agreement
    ref = np.eye(4)
    c = compare("tflite-int8", "m", np.roll(ref, 1, axis=1), ref, np.arange(4), DEFAULT_THRESHOLDS["int8"])
    msg = str(VerificationFailed(VerifyReport((c,), 4, 1.0)))
    assert "(verify.min_agreement)" in msg and "(verify.max_accuracy_drop)" in msg and "--thresholds" not in msg


# ---- real artifacts in the interpreter -----------------------------------------------------

tf = pytest.importorskip("tensorflow")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    from tests.export.helpers import small_cnn
    from toolchain.export.tflite_backend import export_tflite

    d = tmp_path_factory.mktemp("verify")
    good = export_tflite(small_cnn(), "fp32", d / "good.tflite")
    other = tf.keras.models.clone_model(small_cnn())  # same architecture, fresh random weights
    bad = export_tflite(other, "fp32", d / "bad.tflite")
    return good, bad


def test_verify_passes_the_faithful_artifact(artifacts):
    from tests.export.helpers import digits, small_cnn

    report = verify([artifacts[0]], small_cnn(), digits())
    c = report["tflite-fp32"]
    assert report.passed and c.agreement == 1.0 and c.max_abs_diff <= 1e-4
    assert c.accuracy == report.reference_accuracy
    assert report.samples == len(digits().y_eval)


def test_verify_raises_naming_the_artifact_and_its_numbers(artifacts):
    from tests.export.helpers import digits, small_cnn

    good, bad = artifacts
    bad = type(bad)(format="tflite-int8", path=bad.path, size_bytes=bad.size_bytes, sha256=bad.sha256)
    with pytest.raises(VerificationError) as e:
        verify([good, bad], small_cnn(), digits())
    msg = str(e.value)
    assert "1 artifact(s) failed" in msg and "tflite-int8" in msg and "agreement" in msg
    report = verify([good, bad], small_cnn(), digits(), raise_on_failure=False)
    assert not report.passed and [c.format for c in report.failed()] == ["tflite-int8"]
    assert report["tflite-int8"].agreement < 0.5


def test_verify_a_regressor_with_outputs_in_tens(tmp_path):
    """A real TFLite fp32 file of a Dense regressor whose outputs are in tens passes on float
    rounding, with no class checks; the report carries the task and the error metrics."""
    from toolchain.data.dataset import Dataset
    from toolchain.export.tflite_backend import export_tflite

    tf.keras.utils.set_random_seed(0)
    inp = tf.keras.Input((6,))
    h = tf.keras.layers.Dense(16, activation="relu")(inp)
    model = tf.keras.Model(inp, tf.keras.layers.Dense(3)(h))
    w, b = model.layers[-1].get_weights()
    model.layers[-1].set_weights([w * 20, b + 40])
    x = np.random.default_rng(0).normal(size=(64, 6)).astype(np.float32)
    y = (model.predict(x, verbose=0) + 0.5).astype(np.float32)
    ds = Dataset("reg", x, y, x, y, (), (6,), "test", task="regression")
    art = export_tflite(model, "fp32", tmp_path / "reg.tflite")
    report = verify([art], model, ds)
    c = report["tflite-fp32"]
    assert report.passed and report.task == "regression" and np.isnan(report.reference_accuracy)
    assert c.reference_metrics["mse"] == pytest.approx(0.25, rel=1e-3)
    assert c.max_abs_diff > 0 or c.metrics["mse"] == c.reference_metrics["mse"]
