//! The one `sources!` macro of headmix's kernel crates (`headmix-kernels-cuda`,
//! `headmix-kernels-wgsl`): each file of a crate's folder embedded as a named string, the list of
//! all of them, a lookup by file name, and the test that every file is present and named once.

#![no_std]

/// Declares, in the calling crate, one `pub const NAME: &str` per source file (the file's text,
/// from the crate's own folder), `ALL` listing them as `(file name, text)` in declaration order,
/// `get(file)`, and a unit test that every file is non-empty and listed once. Adding a kernel
/// file is one line of the list.
///
/// ```ignore
/// headmix_embed::sources! {
///     /// `common.wgsl`: the uniform block, the bindings, the mask.
///     COMMON = "common.wgsl";
/// }
/// ```
#[macro_export]
macro_rules! sources {
    ($($(#[$doc:meta])* $name:ident = $file:literal;)*) => {
        $(
            $(#[$doc])*
            pub const $name: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/", $file));
        )*

        /// Every source file of the crate as `(file name, text)`, in declaration order.
        pub const ALL: &[(&str, &str)] = &[$(($file, $name)),*];

        /// The source of a file by its name (e.g. the first of [`ALL`]), if this crate has it.
        pub fn get(file: &str) -> Option<&'static str> {
            ALL.iter().find(|(name, _)| *name == file).map(|(_, text)| *text)
        }

        #[cfg(test)]
        mod embedded_sources {
            #[test]
            fn every_source_is_present_and_named_once() {
                for (i, (name, text)) in super::ALL.iter().enumerate() {
                    assert!(!text.is_empty(), "{name} is empty");
                    assert!(super::ALL[..i].iter().all(|(other, _)| other != name), "{name} listed twice");
                    assert_eq!(super::get(name), Some(*text));
                }
                assert_eq!(super::get("no_such_file"), None);
            }
        }
    };
}
