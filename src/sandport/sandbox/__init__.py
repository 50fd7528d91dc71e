"""Sandbox backends (netns now; qemu and external later) behind one interface."""
