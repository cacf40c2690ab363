//! The images a service searches: `cnclip-extract`'s [`ImageSource`] (a cn_clip LMDB split, a MUGE
//! `{split}_imgs.tsv`, or a folder of image files, opened by [`ImageSource::open`]), under the
//! name the service has always given it.

pub use cnclip_extract::ImageSource as Gallery;
