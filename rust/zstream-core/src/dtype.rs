//! Safetensors dtypes, their sizes, and their DLPack codes.

use std::fmt;
use std::str::FromStr;

/// A safetensors element type. Names are exactly the safetensors header names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    Bool,
    U8,
    I8,
    I16,
    U16,
    I32,
    U32,
    I64,
    U64,
    F16,
    Bf16,
    F32,
    F64,
    F8E4M3,
    F8E5M2,
}

/// DLPack `DLDataTypeCode` values (dlpack.h v1.0).
pub mod dl_code {
    pub const INT: u8 = 0;
    pub const UINT: u8 = 1;
    pub const FLOAT: u8 = 2;
    pub const BFLOAT: u8 = 4;
    pub const BOOL: u8 = 6;
}

impl Dtype {
    pub const ALL: [Dtype; 15] = [
        Dtype::Bool,
        Dtype::U8,
        Dtype::I8,
        Dtype::I16,
        Dtype::U16,
        Dtype::I32,
        Dtype::U32,
        Dtype::I64,
        Dtype::U64,
        Dtype::F16,
        Dtype::Bf16,
        Dtype::F32,
        Dtype::F64,
        Dtype::F8E4M3,
        Dtype::F8E5M2,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Dtype::Bool => "BOOL",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::I16 => "I16",
            Dtype::U16 => "U16",
            Dtype::I32 => "I32",
            Dtype::U32 => "U32",
            Dtype::I64 => "I64",
            Dtype::U64 => "U64",
            Dtype::F16 => "F16",
            Dtype::Bf16 => "BF16",
            Dtype::F32 => "F32",
            Dtype::F64 => "F64",
            Dtype::F8E4M3 => "F8_E4M3",
            Dtype::F8E5M2 => "F8_E5M2",
        }
    }

    pub fn size(self) -> usize {
        match self {
            Dtype::Bool | Dtype::U8 | Dtype::I8 | Dtype::F8E4M3 | Dtype::F8E5M2 => 1,
            Dtype::I16 | Dtype::U16 | Dtype::F16 | Dtype::Bf16 => 2,
            Dtype::I32 | Dtype::U32 | Dtype::F32 => 4,
            Dtype::I64 | Dtype::U64 | Dtype::F64 => 8,
        }
    }

    /// The DLPack (code, bits) pair. The F8 types go out as raw bytes (`UINT`, 8): torch's DLPack import does not
    /// know every F8 code, so the Python side views them as the right float8 dtype after import.
    pub fn dlpack(self) -> (u8, u8) {
        let bits = (self.size() * 8) as u8;
        let code = match self {
            Dtype::Bool => dl_code::BOOL,
            Dtype::U8 | Dtype::U16 | Dtype::U32 | Dtype::U64 | Dtype::F8E4M3 | Dtype::F8E5M2 => dl_code::UINT,
            Dtype::I8 | Dtype::I16 | Dtype::I32 | Dtype::I64 => dl_code::INT,
            Dtype::F16 | Dtype::F32 | Dtype::F64 => dl_code::FLOAT,
            Dtype::Bf16 => dl_code::BFLOAT,
        };
        (code, bits)
    }
}

impl FromStr for Dtype {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        Dtype::ALL.iter().copied().find(|d| d.name() == s).ok_or(())
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for d in Dtype::ALL {
            assert_eq!(d.name().parse::<Dtype>(), Ok(d));
        }
        assert!("F12".parse::<Dtype>().is_err());
    }

    #[test]
    fn displays_its_header_name() {
        let shown: Vec<String> = Dtype::ALL.iter().map(ToString::to_string).collect();
        let want = ["BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64", "F16", "BF16", "F32", "F64"];
        assert_eq!(shown[..13], want);
        assert_eq!(shown[13..], ["F8_E4M3", "F8_E5M2"]);
    }

    #[test]
    fn dlpack_codes_and_bits_by_hand() {
        // dlpack.h v1.0: kDLInt 0, kDLUInt 1, kDLFloat 2, kDLBfloat 4, kDLBool 6; bits per element, lanes 1. The F8
        // types go out as 8-bit unsigned bytes.
        let want: [(Dtype, u8, u8); 15] = [
            (Dtype::Bool, 6, 8),
            (Dtype::U8, 1, 8),
            (Dtype::I8, 0, 8),
            (Dtype::I16, 0, 16),
            (Dtype::U16, 1, 16),
            (Dtype::I32, 0, 32),
            (Dtype::U32, 1, 32),
            (Dtype::I64, 0, 64),
            (Dtype::U64, 1, 64),
            (Dtype::F16, 2, 16),
            (Dtype::Bf16, 4, 16),
            (Dtype::F32, 2, 32),
            (Dtype::F64, 2, 64),
            (Dtype::F8E4M3, 1, 8),
            (Dtype::F8E5M2, 1, 8),
        ];
        for (d, code, bits) in want {
            assert_eq!(d.dlpack(), (code, bits), "{d}");
            assert_eq!(8 * d.size(), usize::from(bits), "{d}");
        }
    }
}
