"""Forms of the web UI: they check the shape of what people type; the registry services check the rest."""

from __future__ import annotations

from typing import Any, cast

from django import forms
from django.conf import settings

from monitoring.models import ReceiverKind
from monitoring.notify import EVENT_TYPES
from pipelines.models import Target
from registry import archives
from registry.roles import Role


def parse_tags(text: str) -> dict[str, str]:
    """`key=value` pairs, one per line (or separated by commas)."""
    tags: dict[str, str] = {}
    for raw in text.replace(",", "\n").splitlines():
        line = raw.strip()
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise forms.ValidationError(f"“{line}” is not a tag: write key=value, e.g. team=vision")
        tags[key.strip()] = value.strip()
    return tags


class RegisterForm(forms.Form):
    name = forms.CharField(
        label="Model name", max_length=128,
        help_text="Letters, digits, '.', '_' or '-'. A new name creates the model; "
                  "an existing one gets its next version.",
        widget=forms.TextInput(attrs={"placeholder": "e.g. fraud-detector", "autocomplete": "off", "autofocus": True}),
    )
    archive = forms.FileField(
        label="Model archive", required=False,
        help_text="A .zip or .tar.gz of an MLflow model folder (the folder holding the MLmodel file).",
        widget=forms.FileInput(attrs={"accept": ".zip,.tar,.tar.gz,.tgz,application/zip,application/gzip"}),
    )
    source = forms.CharField(
        label="…or an MLflow source URI", required=False, max_length=1000,
        help_text="runs:/<run id>/<path> or models:/<name>/<version or alias>",
        widget=forms.TextInput(attrs={"placeholder": "runs:/0123abcd…/model", "autocomplete": "off"}),
    )
    description = forms.CharField(
        required=False, max_length=5000, widget=forms.Textarea(attrs={"rows": 3, "placeholder": "What changed?"}),
    )
    tags = forms.CharField(
        required=False, max_length=5000, help_text="Optional, one key=value per line.",
        widget=forms.Textarea(attrs={"rows": 2, "placeholder": "team=vision\ndataset=2024-06"}),
    )

    def clean_name(self) -> str:
        name: str = self.cleaned_data["name"].strip()
        try:
            archives.check_model_name(name)
        except archives.ArchiveError as exc:
            raise forms.ValidationError(str(exc)) from exc
        return name

    def clean_source(self) -> str:
        return str(self.cleaned_data.get("source") or "").strip()

    def clean_tags(self) -> dict[str, str]:
        return parse_tags(self.cleaned_data.get("tags") or "")

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        archive, source = data.get("archive"), data.get("source")
        if archive and source:
            raise forms.ValidationError("Give either an archive or a source URI, not both.")
        if not archive and not source and "source" not in self.errors:
            raise forms.ValidationError("Choose a model archive to upload, or give a runs:/ or models:/ URI.")
        if archive and archive.size > settings.PLATFORM["MAX_UPLOAD_BYTES"]:
            self.add_error("archive", f"The archive is {archive.size:,} bytes; the limit is "
                                      f"{settings.PLATFORM['MAX_UPLOAD_BYTES']:,} bytes.")
        return data


class TokenForm(forms.Form):
    name = forms.CharField(
        max_length=100, help_text="Where it will be used, e.g. gitlab-ci or laptop.",
        widget=forms.TextInput(attrs={"placeholder": "gitlab-ci", "autocomplete": "off"}),
    )
    roles = forms.MultipleChoiceField(
        widget=forms.CheckboxSelectMultiple, help_text="A token can only have roles you have.",
        error_messages={"required": "Tick at least one role for the token."},
    )
    expires_in_days = forms.IntegerField(
        label="Expires after (days)", min_value=0, max_value=3650,
        help_text="0 means it never expires.",
    )

    def __init__(self, *args: Any, roles: list[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        labels = dict(Role.choices)
        field = cast(forms.MultipleChoiceField, self.fields["roles"])
        field.choices = [(role, labels.get(role, role)) for role in roles]
        self.fields["roles"].initial = roles
        self.fields["expires_in_days"].initial = settings.PLATFORM["TOKEN_DEFAULT_DAYS"]


class AuditFilterForm(forms.Form):
    action = forms.CharField(required=False, widget=forms.TextInput(attrs={"placeholder": "e.g. version."}))
    target = forms.CharField(required=False, widget=forms.TextInput(attrs={"placeholder": "e.g. my-model/3"}))
    actor = forms.CharField(required=False, widget=forms.TextInput(attrs={"placeholder": "username"}))


def parse_steps(text: str) -> list[int]:
    """`10, 25, 50` (or spaces, or `%` signs) as a list of whole percents; the service checks the rest."""
    steps = []
    for raw in text.replace(",", " ").replace("%", " ").split():
        try:
            steps.append(int(raw))
        except ValueError as exc:
            raise forms.ValidationError(f"“{raw}” is not a whole percent; write e.g. 10, 25, 50") from exc
    if not steps:
        raise forms.ValidationError("Give at least one canary traffic weight, e.g. 10, 25, 50")
    return steps


class DeploymentForm(forms.Form):
    """What a rollout needs. Empty numbers take the platform's defaults, shown as placeholders."""

    model = forms.CharField(max_length=128, widget=forms.TextInput(attrs={"autocomplete": "off",
                                                                          "list": "model-names"}))
    version = forms.IntegerField(min_value=1, help_text="Only ready versions with a built engine can be deployed.")
    target = forms.ChoiceField(choices=Target.choices, initial=Target.CPU,
                               help_text="The hardware the canary is served on.")
    steps = forms.CharField(
        label="Canary steps (% of traffic)", max_length=200,
        help_text="Increasing percents; the canary holds each step while it is analysed.",
    )
    step_interval_s = forms.IntegerField(label="Seconds per step", min_value=1, required=False)
    bake_s = forms.IntegerField(label="Bake time on the last step (s)", min_value=0, required=False)
    max_p99_ms = forms.FloatField(label="Max p99 latency (ms)", min_value=0.001, required=False,
                                  help_text="A canary slower than this at the 99th percentile is rolled back.")
    max_error_rate_pct = forms.FloatField(label="Max error rate (%)", min_value=0, max_value=100, required=False,
                                          help_text="A canary failing more requests than this is rolled back.")
    min_requests = forms.IntegerField(label="Min canary requests per window", min_value=1, required=False,
                                      help_text="Fewer requests than this and a window is not judged a pass.")
    require_approval = forms.BooleanField(
        label="Require approval", required=False,
        help_text="Wait on the last step until a release manager promotes it, instead of promoting by itself.",
    )

    hil_override = forms.CharField(
        label="Deploy without a passing HIL run: reason", required=False, max_length=2000,
        widget=forms.Textarea(attrs={"rows": 2, "placeholder": "why it may go without one, e.g. the HIL profile's "
                                                              "workers are down and this fixes an outage"}),
        help_text="Only needed when the engine has no passing HIL run on the fleet's hardware; at least 10 "
                  "characters. Recorded in the audit log and on the deployment.",
    )

    def __init__(self, *args: Any, hil_override: bool = False, **kwargs: Any) -> None:
        """`hil_override`: whether this person may deploy without a passing HIL run (Cap.HIL_OVERRIDE); the
        field is not offered otherwise."""
        super().__init__(*args, **kwargs)
        if not hil_override:
            del self.fields["hil_override"]
        defaults = settings.PLATFORM
        self.fields["steps"].initial = ", ".join(str(s) for s in defaults["ROLLOUT_STEPS"])
        placeholders = {
            "step_interval_s": defaults["ROLLOUT_STEP_INTERVAL_S"], "bake_s": defaults["ROLLOUT_BAKE_S"],
            "max_p99_ms": defaults["ROLLOUT_MAX_P99_MS"], "min_requests": defaults["ROLLOUT_MIN_REQUESTS"],
            "max_error_rate_pct": f"{defaults['ROLLOUT_MAX_ERROR_RATE'] * 100:g}",
        }
        for name, value in placeholders.items():
            self.fields[name].widget.attrs["placeholder"] = f"{value:g}" if isinstance(value, float) else str(value)

    def clean_model(self) -> str:
        return str(self.cleaned_data["model"]).strip()

    def clean_steps(self) -> list[int]:
        return parse_steps(self.cleaned_data.get("steps") or "")

    def limits(self) -> dict[str, Any]:
        """The service's keyword arguments: only what was given, the error rate as a fraction."""
        data = self.cleaned_data
        given = {name: data[name] for name in ("target", "steps", "step_interval_s", "bake_s", "max_p99_ms",
                                               "min_requests", "require_approval") if data.get(name) is not None}
        if str(data.get("hil_override") or "").strip():
            given["hil_override"] = str(data["hil_override"]).strip()
        if data.get("max_error_rate_pct") is not None:
            given["max_error_rate"] = data["max_error_rate_pct"] / 100
        return given


class AlertSilenceForm(forms.Form):
    until = forms.DateTimeField(
        input_formats=["%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d %H:%M:%S"],
        widget=forms.DateTimeInput(attrs={"type": "datetime-local"}), help_text="UTC",
        error_messages={"required": "Say until when (UTC).", "invalid": "Until must be a date and time (UTC)."})
    reason = forms.CharField(max_length=500,
                             widget=forms.TextInput(attrs={"placeholder": "why, e.g. a known data change"}),
                             error_messages={"required": "Say why the alert is silenced."})


class AlertResolveForm(forms.Form):
    resolution = forms.CharField(required=False, max_length=500,
                                 widget=forms.TextInput(attrs={"placeholder": "what was done or found"}))


class ReceiverForm(forms.Form):
    """A receiver and its subscription; notify's services check the rest (URL, name taken, event types)."""

    name = forms.CharField(max_length=100, widget=forms.TextInput(attrs={"placeholder": "oncall-slack",
                                                                         "autocomplete": "off"}))
    kind = forms.ChoiceField(choices=ReceiverKind.choices)
    url = forms.CharField(label="URL", max_length=2000, help_text="The http:// or https:// URL the events are "
                          "POSTed to (a Slack incoming webhook's, or your service's).",
                          widget=forms.TextInput(attrs={"placeholder": "https://hooks.example.com/…",
                                                        "autocomplete": "off"}))
    enabled = forms.BooleanField(required=False, initial=True)
    event_types = forms.MultipleChoiceField(
        label="Event types", required=False, widget=forms.CheckboxSelectMultiple,
        choices=[(event, f"{event}: {words}") for event, words in EVENT_TYPES.items()],
        help_text="None ticked: every event.")
    models = forms.CharField(
        label="Models", required=False, max_length=5000, help_text="One model name per line (or separated by "
        "commas). Empty: every model. A model not registered yet may be named.",
        widget=forms.Textarea(attrs={"rows": 2, "placeholder": "fraud-detector\ndigits"}))

    def __init__(self, *args: Any, editing: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if editing:  # a receiver's kind is fixed: its messages' shape is what its URL expects
            del self.fields["kind"]

    def clean_models(self) -> list[str]:
        text: str = self.cleaned_data["models"]
        names = [n.strip() for n in text.replace(",", "\n").splitlines() if n.strip()]
        too_long = [n for n in names if len(n) > 128]
        if too_long:
            raise forms.ValidationError(f"“{too_long[0][:40]}…” is not a model name: names have at most 128 "
                                        "characters")
        return names
