import shutil
import tempfile
from pathlib import Path

from django.core.management.base import BaseCommand

from registry import samples
from registry.audit import SYSTEM
from registry.models import ModelVersion
from registry.services import version_register_from_archive

DEMO_MODEL = "digits-classifier"


def demo_reference_sample() -> samples.ReferenceSample:
    """The rows the demo model is judged against for drift: the held-out quarter of the digits (the same
    split train_demo_model trains on the rest of)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    _, X_test, _, _ = train_test_split(X, y, test_size=0.25, random_state=0)
    return samples.ReferenceSample(rows=X_test.tolist())


def train_demo_model(into: Path, hidden: tuple[int, ...] = (64,)) -> Path:
    """A small scikit-learn classifier on the digits data set that ships with scikit-learn."""
    import mlflow.sklearn
    from mlflow.models import infer_signature
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=0)
    mlp = MLPClassifier(hidden_layer_sizes=hidden, max_iter=300, random_state=0)
    model = make_pipeline(StandardScaler(), mlp).fit(X_train, y_train)
    folder = into / "model"
    # skops (MLflow's default for scikit-learn) asks which types to trust on load: this one we made.
    mlflow.sklearn.save_model(model, str(folder), input_example=X_test[:5],
                              signature=infer_signature(X_test[:5], model.predict(X_test[:5])),
                              skops_trusted_types=["sklearn.neural_network._stochastic_optimizers.AdamOptimizer"])
    return Path(shutil.make_archive(str(into / "model"), "gztar", root_dir=folder))


# What every demo version declares at registration for its HIL runs: a p99 budget of 50 ms (batch 1, one client),
# and that it may be up to twice as slow as the champion (a bigger network is allowed to cost something).
DEMO_HIL_TAGS = {"hil.p99_ms": "50", "hil.max_regression_pct": "100"}


class Command(BaseCommand):
    help = "Register the demo model (digits classifier) unless it is already there."

    def handle(self, *args: object, **options: object) -> None:
        existing = ModelVersion.objects.filter(model__name=DEMO_MODEL).order_by("-version").first()
        if existing is not None:
            self.stdout.write(f"Demo model already registered: {DEMO_MODEL} v{existing.version} ({existing.status})")
            return
        with tempfile.TemporaryDirectory() as tmp:
            archive = train_demo_model(Path(tmp))
            version = version_register_from_archive(
                SYSTEM, DEMO_MODEL, archive,
                description="Small neural network (MLP) on scikit-learn's digits (demo)",
                tags={"demo": "true", "dataset": "sklearn.datasets.load_digits", **DEMO_HIL_TAGS},
                sample=demo_reference_sample(),
            )
        self.stdout.write(f"Demo model registered: {DEMO_MODEL} v{version.version}")
