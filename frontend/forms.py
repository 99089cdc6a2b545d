"""Forms of the web UI: they check the shape of what people type; the registry services check the rest."""

from __future__ import annotations

from typing import Any, cast

from django import forms
from django.conf import settings

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
