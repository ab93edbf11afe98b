"""Tasks built on pmod: data, demos and models that are not part of the runtime."""
