"""Thin DVC stage entry points: parse paths, load params, open the tracking run, call one library function.

Importing this package pins the numeric environment (itm/environment.py) before any stage imports torch."""

from itm import environment

environment.pin()
