/* ProcessPrng for Wine 8.0, whose bcryptprimitives.dll lacks it: every Rust program since 1.78
 * imports it for its random numbers (std's HashMap keys), and without it fails to start
 * (exit code 53, c0000135). It fills the buffer from RtlGenRandom (SystemFunction036 in
 * advapi32), as Windows' own bcryptprimitives does from the same generator. Built with mingw by
 * scripts/test-windows into the Wine prefix; never shipped. */
#include <windows.h>

BOOLEAN WINAPI SystemFunction036(PVOID buffer, ULONG length);

BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len) {
    while (len > 0) {
        ULONG n = len > 0x40000000 ? 0x40000000 : (ULONG)len;
        if (!SystemFunction036(data, n)) return FALSE;
        data += n;
        len -= n;
    }
    return TRUE;
}
