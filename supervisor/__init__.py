"""The root process: child lifecycle, launch zygote, control socket."""
