"""Images: the base cache, image sources, formats and instance disks."""
