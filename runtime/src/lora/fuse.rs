//! placeholder: the fuse kernel (being written)
