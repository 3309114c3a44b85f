"""Analysis above the relaxation engine: implicit gradients of relaxed structures, Hessians
and normal modes, the saddle-point escape (an engine hook), and fitting potentials to
properties of relaxed structures. The engine and everything below it never import this."""
