"""wanwu's HTTP gateway and command line. Only this package imports flask."""
