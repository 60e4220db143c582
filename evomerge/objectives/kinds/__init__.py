"""Objective kinds, one module each (named after the kind); the registry imports every module here."""
