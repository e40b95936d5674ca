"""Turn raw datasets into the files and manifests that :mod:`mink_ssl.data` reads."""
