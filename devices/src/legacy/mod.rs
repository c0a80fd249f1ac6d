//! Legacy PC devices on port I/O: the 16550A UART and the i8042 controller.

mod i8042;
pub mod persist;
pub mod serial;

pub use i8042::I8042;
pub use serial::{EventFdTrigger, SerialDevice, SerialInput};
