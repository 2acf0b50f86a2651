"""Curation on Ray Data: readers, steps, and the pipeline that writes data/, dropped/ and manifest.json."""
