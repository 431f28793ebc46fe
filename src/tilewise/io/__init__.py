"""Real formats in and out: GeoTIFF/COG and slides into OME-Zarr; outputs to COG and OME-TIFF."""
