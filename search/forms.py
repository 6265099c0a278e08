from __future__ import annotations

from django import forms

from search.imaging import ACCEPTED_FORMATS_TEXT, ImageRejected
from search.models import Dataset, Image


class ImageUploadForm(forms.ModelForm):
    """Adding an image in admin: the same validation and duplicate check as the importer."""

    upload = forms.FileField(label="Image file", help_text=ACCEPTED_FORMATS_TEXT)

    class Meta:
        model = Image
        fields = ["dataset", "label"]

    def clean(self):
        cleaned = super().clean()
        upload = cleaned.get("upload")
        dataset: Dataset | None = cleaned.get("dataset")
        if upload is None or dataset is None:
            return cleaned
        from django.conf import settings

        from search.imaging import decode_image

        if upload.size > settings.CBIR_MAX_IMPORT_FILE_BYTES:
            raise forms.ValidationError(f"The file is larger than the limit of {settings.CBIR_MAX_IMPORT_FILE_BYTES:,} bytes.")
        data = upload.read()
        try:
            decoded = decode_image(data)
        except ImageRejected as exc:
            raise forms.ValidationError(f"Not accepted: {exc}.") from None
        duplicate = Image.objects.filter(dataset=dataset, sha256=decoded.sha256).first()
        if duplicate:
            raise forms.ValidationError(f"This image is already in {dataset} as #{duplicate.pk} ({duplicate.original_filename}).")
        cleaned["data"] = data
        return cleaned


class SetLabelForm(forms.Form):
    label = forms.CharField(max_length=200, required=False, help_text="Leave empty to clear the label.")


class SetSplitForm(forms.Form):
    from search.models import Split

    split = forms.ChoiceField(choices=Split.choices)


class ZipImportForm(forms.Form):
    archive = forms.FileField(label="Zip of images", help_text="Images in any folders; other files are skipped.")
    labels_from_folders = forms.BooleanField(required=False, initial=True,
                                             help_text="Label each image with its folder path inside the zip.")

    def clean_archive(self):
        import zipfile

        from django.conf import settings

        upload = self.cleaned_data["archive"]
        if upload.size > settings.CBIR_ZIP_MAX_UPLOAD_BYTES:
            raise forms.ValidationError(f"The zip is larger than the limit of {settings.CBIR_ZIP_MAX_UPLOAD_BYTES:,} bytes.")
        if not zipfile.is_zipfile(upload):
            raise forms.ValidationError("This is not a zip file.")
        upload.seek(0)
        return upload
