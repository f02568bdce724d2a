"""Building blocks every model and attention kind shares (rotary embedding, RMSNorm, SwiGLU): a leaf
package, so ltrain.models and ltrain.attention both import it and not each other."""
