"""Calibration data: what each target linear sees."""
