"""Pure tensor functions on ViT tokens: pooling, style statistics, facets, log-binning, saliency,
storage codecs. No I/O and no model loading here; everything is testable on small arrays."""
