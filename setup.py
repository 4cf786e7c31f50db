"""Build hook for the optional C extension (runtime/_cext). Metadata lives in pyproject.toml."""
from setuptools import setup

setup()
