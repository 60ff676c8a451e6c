"""Z-Image (``ZImagePipeline`` folders): the adapter and tiny test folders."""
