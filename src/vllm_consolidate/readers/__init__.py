"""Transitional home of the torch zip reader; it moves to formats/."""
