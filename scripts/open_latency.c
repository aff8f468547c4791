/* LD_PRELOAD shim for `addertrain bench data`: every open waits
 * ADDERTRAIN_OPEN_LATENCY_US microseconds first, standing in for the metadata latency of a
 * network file system. The variable is read at each call, so one process can measure
 * several latencies. Built by the benchmark with the system C compiler:
 *   cc -O2 -shared -fPIC -o open_latency.so open_latency.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/types.h>
#include <time.h>

static void wait_latency(void) {
    const char *value = getenv("ADDERTRAIN_OPEN_LATENCY_US");
    long us = value ? strtol(value, NULL, 10) : 0;
    if (us > 0) {
        struct timespec t = {us / 1000000, (us % 1000000) * 1000};
        while (nanosleep(&t, &t) != 0) {
        }
    }
}

/* The mode argument exists only when the flags create a file. */
static mode_t mode_of(int flags, va_list args) {
    return (flags & O_CREAT) || (flags & __O_TMPFILE) == __O_TMPFILE ? va_arg(args, mode_t) : 0;
}

#define OPEN(name)                                                   \
    int name(const char *path, int flags, ...) {                     \
        static int (*real)(const char *, int, ...);                  \
        va_list args;                                                \
        va_start(args, flags);                                       \
        mode_t mode = mode_of(flags, args);                          \
        va_end(args);                                                \
        if (!real) real = dlsym(RTLD_NEXT, #name);                   \
        wait_latency();                                              \
        return real(path, flags, mode);                              \
    }

#define OPENAT(name)                                                 \
    int name(int dir, const char *path, int flags, ...) {            \
        static int (*real)(int, const char *, int, ...);             \
        va_list args;                                                \
        va_start(args, flags);                                       \
        mode_t mode = mode_of(flags, args);                          \
        va_end(args);                                                \
        if (!real) real = dlsym(RTLD_NEXT, #name);                   \
        wait_latency();                                              \
        return real(dir, path, flags, mode);                         \
    }

/* glibc's fopen opens through an internal call that the names above do not catch. */
#define FOPEN(name)                                                  \
    FILE *name(const char *path, const char *how) {                  \
        static FILE *(*real)(const char *, const char *);            \
        if (!real) real = dlsym(RTLD_NEXT, #name);                   \
        wait_latency();                                              \
        return real(path, how);                                      \
    }

OPEN(open)
OPEN(open64)
OPENAT(openat)
OPENAT(openat64)
FOPEN(fopen)
FOPEN(fopen64)
