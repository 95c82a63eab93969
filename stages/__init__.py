"""Thin DVC stage entry points: parse paths, load params, open the tracking run, call one library function."""
