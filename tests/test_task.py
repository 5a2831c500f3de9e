"""toolchain.task: inferring the task from model and data, metrics per task, the guard's number."""
import numpy as np
import pytest

from toolchain.data.dataset import Dataset
from toolchain.errors import ConfigError
from toolchain.task import evaluate, infer_task, metric_change, primary_metric, resolve_task, top1_agreement


def _dataset(task, y, x=None, anomaly=None, classes=()):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(len(y), 6)).astype(np.float32) if x is None else x
    return Dataset("d", x, y, x, y, classes, tuple(x.shape[1:]), "test", task=task, anomaly_eval=anomaly)


def _dense(n_in, n_out, activation):
    import tensorflow as tf

    inp = tf.keras.Input((n_in,))
    return tf.keras.Model(inp, tf.keras.layers.Dense(n_out, activation=activation)(inp))


def test_infer_task_from_targets_and_model():
    labels = _dataset("classification", np.array([0, 1, 0, 1], np.int64), classes=("a", "b"))
    assert infer_task(_dense(6, 2, "softmax"), labels) == "classification"
    reg = _dataset("regression", np.ones((4, 2), np.float32))
    assert infer_task(_dense(6, 2, None), reg) == "regression"
    x = np.random.default_rng(1).normal(size=(4, 6)).astype(np.float32)
    # targets equal to the inputs, even when the dataset only says "regression"
    assert infer_task(None, _dataset("regression", x.copy(), x=x)) == "autoencoder"
    # output shape == input shape with a linear output
    assert infer_task(_dense(6, 6, None), _dataset("regression", np.ones((4, 6), np.float32))) == "autoencoder"
    assert infer_task(_dense(6, 6, "sigmoid"), _dataset("regression", np.ones((4, 6), np.float32))) == "regression"


def test_resolve_task_refuses_an_override_the_data_contradicts():
    reg = _dataset("regression", np.ones((4, 2), np.float32))
    assert resolve_task(None, reg, "autoencoder") == "autoencoder"
    with pytest.raises(ConfigError, match="'classification' was given but dataset 'd' has float targets"):
        resolve_task(None, reg, "classification")
    labels = _dataset("classification", np.array([0, 1, 0, 1], np.int64), classes=("a", "b"))
    with pytest.raises(ConfigError, match="integer class labels"):
        resolve_task(None, labels, "regression")
    with pytest.raises(ConfigError, match="is not one of classification, regression, autoencoder"):
        resolve_task(None, labels, "detection")


def test_evaluate_classification_and_agreement():
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    assert evaluate("classification", np.array([0, 1, 1]), scores) == {"samples": 3, "accuracy": pytest.approx(2 / 3)}
    assert top1_agreement(scores, np.array([[1, 0], [0, 1], [0, 1]])) == pytest.approx(2 / 3)


def test_evaluate_autoencoder_errors_and_auc():
    t = np.zeros((4, 3))
    p = np.array([[0, 0, 0], [1, 1, 1], [0, 0, 3], [2, 0, 0]], float)
    m = evaluate("autoencoder", t, p, anomaly=np.array([0, 1, 1, 0]))
    np.testing.assert_allclose(m["reconstruction_error"], [0, 1, 3, 4 / 3])
    assert m["mse"] == pytest.approx(np.mean(p ** 2)) and m["mae"] == pytest.approx(np.mean(p))
    # anomalous samples score 1 and 3, normal 0 and 4/3: 3 of 4 pairs ordered right
    assert m["auc"] == pytest.approx(0.75)
    assert "auc" not in evaluate("autoencoder", t, p, anomaly=np.zeros(4, int))
    assert "reconstruction_error" not in evaluate("regression", t, p)


def test_primary_metric_and_metric_change():
    assert primary_metric("classification", False) == ("accuracy", True)
    assert primary_metric("regression", False) == ("mse", False)
    assert primary_metric("autoencoder", True) == ("auc", True)
    assert primary_metric("autoencoder", False) == ("mse", False)
    c = metric_change("classification", {"accuracy": 0.90}, {"accuracy": 0.87})
    assert c.metric == "accuracy" and c.drop == pytest.approx(0.03)
    c = metric_change("regression", {"mse": 2.0}, {"mse": 2.2})
    assert c.metric == "mse" and c.drop == pytest.approx(0.10) and "+10.0%" in c.describe()
    assert metric_change("regression", {"mse": 2.0}, {"mse": 1.0}).drop == pytest.approx(-0.5)
    c = metric_change("autoencoder", {"mse": 1.0, "auc": 0.9}, {"mse": 1.5, "auc": 0.85})
    assert c.metric == "auc" and c.drop == pytest.approx(0.05)


def test_targets_compatible_checks_output_width():
    from toolchain.errors import DataError
    from toolchain.pipeline import check_targets_compatible

    reg = _dataset("regression", np.ones((4, 2), np.float32))
    check_targets_compatible(reg, (6,), (2,))
    check_targets_compatible(reg, (None,), (None,))
    with pytest.raises(DataError, match=r"samples have shape \(6,\) but the model expects \(5,\); "
                                        r"targets have shape \(2,\) but the model outputs \(3,\)"):
        check_targets_compatible(reg, (5,), (3,))


def test_relative_mse_increase_has_a_floor_on_the_targets_scale():
    from toolchain.task import mse_floor_for

    y = np.full((10, 2), 50.0)  # mean square 2500: floor 2.5e-3
    assert mse_floor_for(y) == pytest.approx(2.5e-3)
    c = metric_change("regression", {"mse": 0.0}, {"mse": 1e-6}, mse_floor_for(y))
    assert c.drop == pytest.approx(4e-4)  # rounding of a perfect fit is not an infinite increase


def test_load_inputs_resolves_the_task_from_real_files(tmp_path):
    """An npz without labels (an autoencoder's data) and a saved dense autoencoder load through
    ``load_inputs``: the task is autoencoder, the output width is checked against the targets, and
    a classification override of label-less data is refused."""
    import tensorflow as tf

    from toolchain.errors import DataError
    from toolchain.pipeline import load_inputs

    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 8)).astype(np.float32)
    np.savez(tmp_path / "ae.npz", x=x, x_eval=x[:10], anomaly_eval=np.array([0, 1] * 5, np.int64))
    inp = tf.keras.Input((8,))
    tf.keras.Model(inp, tf.keras.layers.Dense(8)(inp)).save(tmp_path / "ae.keras")
    tf.keras.Model(inp, tf.keras.layers.Dense(5)(inp)).save(tmp_path / "narrow.keras")
    model, ds = load_inputs(str(tmp_path / "ae.keras"), f"npz:{tmp_path / 'ae.npz'}")
    assert ds.task == "autoencoder" and ds.anomaly_eval is not None
    with pytest.raises(DataError, match=r"targets have shape \(8,\) but the model outputs \(5,\)"):
        load_inputs(str(tmp_path / "narrow.keras"), f"npz:{tmp_path / 'ae.npz'}")
    # the loader or resolve_task refuses a classification override of label-less data
    with pytest.raises((ConfigError, DataError)):
        load_inputs(str(tmp_path / "ae.keras"), f"npz:{tmp_path / 'ae.npz'}", task="classification")


def test_paired_change_is_the_metric_drop_with_its_paired_standard_error():
    """100 samples: the original gets 90 right, the artifact loses 6 of those and wins 2 others back:
    4 points lost, and the standard error counts only the 8 samples where the two differ."""
    from toolchain.task import paired_change

    y = np.zeros(100, int)
    right, wrong = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    original = np.array([right] * 90 + [wrong] * 10)
    artifact = original.copy()
    artifact[:6] = wrong   # 6 lost
    artifact[90:92] = right  # 2 won
    drop, se = paired_change("classification", y, original, artifact)
    d = np.array([1.0] * 6 + [-1.0] * 2 + [0.0] * 92)
    assert drop == pytest.approx(0.04) == pytest.approx(metric_change(
        "classification", evaluate("classification", y, original), evaluate("classification", y, artifact)).drop)
    assert se == pytest.approx(d.std(ddof=1) / 10)
    assert paired_change("classification", y, original, original) == (0.0, 0.0)
    # regression: the relative MSE increase, as metric_change measures it
    t = np.ones((4, 2))
    drop, se = paired_change("regression", t, t + 1.0, t + np.array([[1.0], [1.0], [2.0], [2.0]]))
    assert drop == pytest.approx(1.5) and se > 0  # MSE 1 -> 2.5
